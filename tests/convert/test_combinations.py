"""Conversion and export combined with the adapter's other features, each checked end to end with the real peft
package or the LoRA's dense ΔW: layer selection × export × PEFT, stacked adapters × export, PEFT's rank patterns ×
conversion × merging, GPT-2's ``fan_in_fan_out`` × conversion × export, every scale format × export."""

import contextlib
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from lordba import LoRDBAConfig, LoRDBAModel, export_lora, get_lordba_model
from lordba.convert import convert_lora, read_lora

from .test_peft_reader import peft_adapter
from conftest import TINY, tiny_llama

IDS = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(12))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_delta(lora, path):
    layer = lora.layers[path]
    return layer.scaling * layer.B.double() @ layer.A.double()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32)).eval()


@pytest.mark.parametrize("source", ["model", "folder"])
def test_layers_to_transform_exports_the_layers_peft_wraps_and_their_outputs(tmp_path, source):
    cfg = LoRDBAConfig(r=4, init="random", scale_dtype="float32", layers_to_transform=[1], layers_pattern="layers")
    lm = get_lordba_model(tiny_llama(0), cfg)
    with torch.no_grad():
        for adapter in lm.adapter_modules("default").values():
            adapter.scale_out.normal_(0, 0.2)
    ours = logits(lm)
    assert (ours - logits(tiny_llama(0))).abs().max() > 0.05
    lm.save_pretrained(tmp_path / "native")
    with (
        pytest.warns(UserWarning) if source == "folder" else contextlib.nullcontext()
    ):  # (the base is unknown from the folder)
        export_lora(lm if source == "model" else tmp_path / "native", tmp_path / "peft", dtype="float32")
    peft = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft")
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(lm.adapter_modules("default"))
    torch.testing.assert_close(logits(peft), ours, rtol=0, atol=1e-5)


def test_stacked_adapters_export_the_named_adapter_alone(tmp_path):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype="float32"))
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random", scale_dtype="float32"))
    lm.set_adapter(["default", "b"])
    export_lora(lm, tmp_path / "a", dtype="float32")
    export_lora(lm, tmp_path / "b", adapter_name="b", dtype="float32")
    for name in ("default", "b"):
        lm.set_adapter(name)
        peft = PeftModel.from_pretrained(tiny_llama(0), tmp_path / ("a" if name == "default" else "b"))
        torch.testing.assert_close(logits(peft), logits(lm), rtol=0, atol=1e-5)


def test_a_peft_rank_pattern_converts_at_its_ranks_and_merges_to_the_unmerged_outputs(tmp_path):
    _, path = peft_adapter(tmp_path, r=4, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})
    state, report = convert_lora(path, scale_dtype="float32", progress=False)
    ranks = {p: rec.r for p, rec in state.modules.items()}
    assert {p.rsplit(".", 1)[1]: r for p, r in ranks.items()} == {"q_proj": 4, "v_proj": 2, "down_proj": 4}
    lm = LoRDBAModel(tiny_llama(0))
    lm.load_adapter_state(state, "default")
    lm.set_adapter("default")
    lora = read_lora(path)
    for layer in report.layers:  # the alpha pattern's scaling (0.75 for down_proj) is in the target
        target = lora_delta(lora, layer.path)
        got = lm.adapter_modules("default")[layer.path].delta_weight().double()
        assert ((got - target).norm() / target.norm()).item() == pytest.approx(layer.rel_error, abs=1e-5)
        assert layer.rel_error < 0.8
    ours = logits(lm)
    torch.testing.assert_close(logits(lm.merge_and_unload()), ours, rtol=0, atol=1e-5)


def test_gpt2_fan_in_fan_out_converts_in_the_layers_orientation_and_exports_for_peft(tmp_path):
    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc", "c_proj"],
        fan_in_fan_out=True,
        init_lora_weights="gaussian",
    )
    peft = get_peft_model(gpt2(), config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft.save_pretrained(tmp_path / "lora")
    lora = read_lora(tmp_path / "lora")
    for path in lora.layers:  # ΔW as the layer computes it (out × in): PEFT's own, transposed for Conv1D
        delta = peft.get_submodule("base_model.model." + path).get_delta_weight("default").T
        torch.testing.assert_close(lora_delta(lora, path).float(), delta, rtol=1e-5, atol=1e-6)
    state, report = convert_lora(tmp_path / "lora", r=24, scale_dtype="float32", progress=False)
    assert max(layer.rel_error for layer in report.layers) < 0.3  # transposed, the square c_proj would not fit
    lm = LoRDBAModel(gpt2())
    lm.load_adapter_state(state, "default")
    lm.set_adapter("default")
    ours = logits(lm)
    export_lora(lm, tmp_path / "export", dtype="float32")
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(logits(PeftModel.from_pretrained(gpt2(), tmp_path / "export")), ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(lm.merge_and_unload()), ours, rtol=0, atol=1e-5)


def test_a_converted_layer_selection_round_trips_through_export(tmp_path):
    _, path = peft_adapter(tmp_path, layers_to_transform=[1], target_modules=["q_proj", "v_proj"])
    state, _ = convert_lora(path, r=8, scale_dtype="float32", progress=False)
    assert sorted(state.modules) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    lm = LoRDBAModel(tiny_llama(0))
    lm.load_adapter_state(state, "default")
    lm.set_adapter("default")
    ours = logits(lm)
    export_lora(lm, tmp_path / "export", dtype="float32")
    exported = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert exported["layers_to_transform"] == [1]
    peft = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "export")
    assert {n for n, m in peft.named_modules() if hasattr(m, "lora_A")} == {
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    }
    torch.testing.assert_close(logits(peft), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale_dtype", ["int4", "int8", "bfloat16"])
def test_every_scale_format_resumed_as_latent_exports_the_packed_adapters_outputs(tmp_path, scale_dtype):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype=scale_dtype))
    lm.pack()
    want = logits(lm)
    lm.unpack_to_latent("default")
    export_lora(lm, tmp_path / "export", dtype="float32")
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(tiny_llama(0), tmp_path / "export")), want, rtol=0, atol=1e-5
    )
