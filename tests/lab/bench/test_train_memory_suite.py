"""The train-memory suite's run on a tiny model (the real-model measurement is ``lordba bench --suite
train-memory``): the files it writes."""

import json

import torch

import lordba.quant.cache
import lordba_lab.assets
import lordba_lab.assets.models
from lordba_lab.bench import suites, train_memory

from conftest import tiny_llama


def test_the_suite_is_discovered_and_not_default():
    assert suites()["train-memory"] is train_memory and not train_memory.DEFAULT


def test_a_quick_run_writes_json_and_markdown_naming_the_hardware(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lordba_lab.assets, "load_model_and_tokenizer", lambda: (tiny_llama(0), None))
    monkeypatch.setattr(lordba_lab.assets.models, "resolve_model_path", lambda _: None)
    monkeypatch.setattr(lordba.quant.cache, "quantize_model_cached", lambda model, *a, **k: model)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    monkeypatch.setattr(train_memory, "_batch", lambda tok, batch_size, length: batch)
    monkeypatch.setattr(train_memory, "hardware", lambda: {"cpu": "Test CPU 9000", "cores": 2})
    files = train_memory.run(tmp_path, quick=True)
    assert {f.name for f in files} == {"train_memory.json", "train_memory.md"}
    saved = json.loads((tmp_path / "train_memory.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["lora-fp32", "lordba-fp32-latents", "lordba-bf16-latents"]
    assert saved["hardware"]["cpu"] == "Test CPU 9000"
    md = (tmp_path / "train_memory.md").read_text()
    assert "| step s |" in md and "Test CPU 9000" in md  # absolute step times come with the hardware
