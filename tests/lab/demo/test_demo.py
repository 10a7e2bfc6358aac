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


def _demo(out, n):
    from types import SimpleNamespace

    from lordba_lab.demo.run import QUICK

    rows = [{"method": f"method {i} " + "x" * 40, "mode": None, "bytes": 100 + i, "file_bytes": 200 + i, "bpw": 1.0,
             "ratio_vs_lora": 2.0, "metric": 0.5, "eval_loss": 1.0 + i, "train_s": 0.1, "peak_bytes": None}
            for i in range(n)]  # fmt: skip
    return SimpleNamespace(out=out, s=QUICK, rows=rows, task=SimpleNamespace(description="a task"))


def test_the_results_and_plots_of_a_run_that_fails_writing_them_leave_the_earlier_ones_whole(tmp_path, capsys):
    """Each result file and plot is replaced whole or not at all: a write that failed half-way (a full disk,
    a kill) left a truncated results.json / results.md / PNG in place of the earlier run's."""
    from full_disk import disk_full_after
    from lordba_lab.demo.plots import error_vs_rmr, quality_vs_bytes
    from lordba_lab.demo.run import _write

    serving = {"adapters": ["a"], "memory_bytes": {"a": 1}, "fp16_lora_memory_bytes": {"a": 2}, "adapters_per_gib": 1,
               "fp16_lora_adapters_per_gib": 1, "hotswap_s_median": 0.1, "mixed_batch_max_abs_diff": 0.0}  # fmt: skip
    layers = [{"module": f"l.{i}.q_proj", "rmr_A": 0.1 * i, "rmr_B": 0.2, "rel_error": 0.3} for i in range(40)]

    def write(demo):
        _write(demo, serving, layers, 1.0)
        quality_vs_bytes(demo.rows, tmp_path / "quality_vs_bytes.png", "exact match")
        error_vs_rmr(layers, tmp_path / "error_vs_rmr.png")

    write(_demo(tmp_path, 3))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(before) == 7 and all(len(b) > 200 for b in before.values()), {k: len(b) for k, b in before.items()}
    with disk_full_after(200), pytest.raises(OSError):
        _write(_demo(tmp_path, 12), serving, layers, 2.0)
    for plot in (lambda: quality_vs_bytes(_demo(tmp_path, 12).rows, tmp_path / "quality_vs_bytes.png", "em"),
                 lambda: error_vs_rmr(layers[:5], tmp_path / "error_vs_rmr.png")):  # fmt: skip
        with disk_full_after(200), pytest.raises(OSError):
            plot()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    write(_demo(tmp_path, 12))
    assert len(json.loads((tmp_path / "results.json").read_text())) == 12
