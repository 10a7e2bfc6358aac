"""Quick start on the real SmolLM2-135M-Instruct: train a LoRDBA adapter for a few steps, save it,
inspect its size, reload it, and export it to a plain PEFT LoRA that PEFT loads.

Run it with ``python examples/quickstart.py`` after ``scripts/setup.sh`` (about two minutes on 2 CPU cores).
"""

import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from lordba import LoRDBAConfig, LoRDBAModel, export_lora, get_lordba_model
from lordba_lab.assets import load_model_and_tokenizer

model, tok = load_model_and_tokenizer()  # the embedded default; or a path to your own HF model
texts = [
    "Review: a warm, funny and beautifully acted film. Sentiment: positive",
    "Review: a dull, lifeless script that wastes its cast. Sentiment: negative",
]
batch = tok(texts, return_tensors="pt", padding=True)
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

torch.manual_seed(0)
lm = get_lordba_model(model, LoRDBAConfig(r=16, alpha=32, scale_dtype="int8", target_modules=["q_proj", "v_proj"]))
lm.print_trainable_parameters()
# 1e-4: the measured best for LoRDBA in every mode (docs/training.md), the `lordba train` default
opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
for step in range(8):
    loss = lm(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

out = Path(tempfile.mkdtemp()) / "adapter"
lm.save_pretrained(out)  # packed signs + int8 scales, crash-safe, checksummed
print(lm.size_report().summary())

lm.eval()
reloaded = LoRDBAModel.from_pretrained(load_model_and_tokenizer()[0], out)
with torch.no_grad():
    same = torch.equal(lm(**batch).logits, reloaded(**batch).logits)
print("reloaded adapter gives identical logits:", same)

export_lora(out, out.with_name("peft_lora"))  # dense LoRA for PEFT / vLLM / LoRAX
peft_model = PeftModel.from_pretrained(load_model_and_tokenizer()[0], out.with_name("peft_lora"))
with torch.no_grad():
    diff = (peft_model(**batch).logits - reloaded(**batch).logits).abs().max().item()
print(f"PEFT runs the exported LoRA; max logit difference vs LoRDBA: {diff:.2e} (fp16 export)")
