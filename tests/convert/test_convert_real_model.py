"""Round trip with the ecosystem on the real SmolLM2-135M: a PEFT LoRA made with PEFT's own API →
convert → logits on real text vs the LoRA → export_lora → PEFT loads it and matches LoRDBA."""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lordba import LoRDBAModel, export_lora
from lordba.convert import convert_lora
from lordba_lab.assets import load_model_and_tokenizer

pytestmark = pytest.mark.real_model

TEXTS = [
    "The film is a charming, funny and beautifully acted story about growing up.",
    "A dull, lifeless script that wastes a talented cast and two hours of my evening.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits.double()


def test_peft_lora_to_lordba_and_back_to_peft_on_smollm2(tmp_path):
    model, tok = load_model_and_tokenizer()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    base = logits(model, batch)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    with torch.no_grad():  # A keeps PEFT's Kaiming-uniform init; B random instead of zero
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    lora = logits(pm, batch)
    lora_dir = tmp_path / "lora"
    pm.save_pretrained(lora_dir)

    state, report = convert_lora(lora_dir, progress=False)
    assert len(report.layers) == 210 and {lr.r for lr in report.layers} == {16}
    base_model = pm.unload()  # the untouched base (the LoRA was never merged)
    assert torch.equal(logits(base_model, batch), base)
    lm = LoRDBAModel(base_model)
    lm.load_adapter_state(state, "default")
    lm.set_adapter("default")
    ours = logits(lm, batch)

    # Relative error of the adapter's contribution to the logits, on real tokens only. To first
    # order the contribution is a linear map of the stacked ΔW's, and the conversion error of random
    # factors is as "random" as ΔW itself, so the map shrinks or grows both alike: the logit error
    # should be close to the ‖ΔW‖-weighted ΔW error of the report. We allow 1.5x for the
    # nonlinearity (attention softmax, SiLU, norms) and the non-isotropy of the map.
    delta_lora = (lora - base)[mask]
    delta_ours = (ours - base)[mask]
    contrib_err = ((delta_ours - delta_lora).norm() / delta_lora.norm()).item()
    print(
        f"SmolLM2 r=16 random LoRA: ΔW error {report.total_rel_error:.4f}, logit-contribution error "
        f"{contrib_err:.4f}, contribution/base logits {delta_lora.norm().item() / base[mask].norm().item():.4f}"
    )
    assert 0.0 < report.total_rel_error < 0.9
    assert contrib_err < 1.5 * report.total_rel_error
    # the converted adapter does carry the LoRA's effect: far closer to it than the base is
    assert (delta_ours - delta_lora).norm() < 0.9 * delta_lora.norm()

    out = export_lora(state, tmp_path / "exported", dtype="float32")
    base_again, _ = load_model_and_tokenizer()
    peft_again = PeftModel.from_pretrained(base_again, out)
    exported = logits(peft_again, batch)
    scale = ours[mask].abs().max().item()
    assert (exported - ours)[mask].abs().max().item() < 1e-4 * max(scale, 1.0)
    assert math.isfinite(scale)
