"""End to end on the real SmolLM2-135M-Instruct (fetched and cached by the project's set-up; the
fixture fetches it if it is missing, it never skips)."""

import json
import subprocess
import sys

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.cli import main
from lordba_lab.assets import load_model_and_tokenizer

pytestmark = pytest.mark.real_model

TEXTS = [
    "The film is a charming, funny and beautifully acted story about growing up.",
    "A dull, lifeless script that wastes a talented cast.",
]

RELOAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))  # the parent's: another thread count sums in another order
from lordba import LoRDBAModel
from lordba_lab.assets import load_model_and_tokenizer
model, tok = load_model_and_tokenizer()
lm = LoRDBAModel.from_pretrained(model, sys.argv[1])
batch = tok(%r, return_tensors="pt", padding=True)
with torch.no_grad():
    torch.save(lm(**batch).logits, sys.argv[2])
"""


@pytest.fixture(scope="module")
def real():
    return load_model_and_tokenizer()


def test_train_save_reload_in_a_fresh_process_gives_identical_logits(real, tmp_path, capsys):
    model, tok = real
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        base_logits = model(**batch).logits
    torch.manual_seed(0)
    lm = get_lordba_model(model, LoRDBAConfig(r=16, scale_dtype="int8"))
    with torch.no_grad():
        assert torch.equal(lm(**batch).logits, base_logits)  # cold start is a no-op on the real model
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = lm(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lm.eval()
    with torch.no_grad():
        trained = lm(**batch).logits
    assert not torch.equal(trained, base_logits)
    lm.save_pretrained(tmp_path / "adapter")
    script = tmp_path / "reload.py"
    script.write_text(RELOAD % (TEXTS,))
    args = [str(tmp_path / "adapter"), str(tmp_path / "logits.pt"), str(torch.get_num_threads())]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), trained)

    assert main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    size = json.loads(capsys.readouterr().out)["size"]
    assert len(size["modules"]) == 210 and size["scale_dtype"] == "int8"
    assert size["ratio_payload"] > 10.0 and size["ratio_file"] > 9.0
    print(f"SmolLM2 r=16 int8: file {size['ratio_file']:.2f}x, payload {size['ratio_payload']:.2f}x vs fp16 LoRA")
