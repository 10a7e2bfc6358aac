"""`lordba demo --quick` on the real model: the output contract (structure, not quality)."""

import json

import pytest

from lordba.cli import main

EXPECTED = {
    ("base", None),
    ("fp16 LoRA r=16", None),
    ("fp16 LoRA r=2", None),
    ("RTN 1-bit", "g64"),
    ("RTN 2-bit", "g64"),
    ("LoRAQuant-style", "2-bit head + 1-bit tail"),
    ("BitDelta-style", "sign x 1 scale/matrix"),
    ("LoRDBA", "ptq (float16 scales)"),
    ("LoRDBA", "ptq (int8 scales)"),
    ("LoRDBA", "qat"),
    ("LoRDBA", "qat-from-lora"),
    ("LoRDBA", "scales-only"),
}


@pytest.mark.long
def test_quick_demo_writes_the_table_json_and_plots(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["mode"]) for r in rows} == EXPECTED
    for r in rows:
        assert {"method", "mode", "bytes", "bpw", "metric", "eval_loss"} <= set(r)
        assert 0.0 <= r["metric"] <= 1.0 and r["eval_loss"] > 0 and r["eval_size"] == 4
    lordba = [r for r in rows if r["method"] == "LoRDBA"]
    assert all(r["file_bytes"] > r["bytes"] > 0 for r in lordba)
    int8 = [r for r in lordba if "float16" not in r["mode"]]
    assert all(r["ratio_vs_lora"] > 10 for r in int8)  # payload ratio of the 8-bit scale format
    md = (out / "results.md").read_text()
    assert "| method |" in md and "Many adapters" in md
    for png in ("quality_vs_bytes.png", "error_vs_rmr.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    serving = json.loads((out / "serving.json").read_text())
    assert len(serving["adapters"]) == 4 and serving["mixed_batch_max_abs_diff"] < 1e-3
    assert serving["adapters_per_gib"] > serving["fp16_lora_adapters_per_gib"]
    for name in serving["adapters"]:  # r=16, loaded compact: signs + int8 scales ≈ 0.095 (float32 scales: 0.19)
        assert serving["memory_bytes"][name] < 0.12 * serving["fp16_lora_memory_bytes"][name]
