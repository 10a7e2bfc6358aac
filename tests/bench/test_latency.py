"""The latency suite's machinery (never timings): interleaving, statistics, one real branch case,
the report and the files of a run with the slow parts replaced."""

import json

import pytest
import torch

from lordba import ConfigError
from lordba.bench import _latency_model, _timing, latency, suites


def test_the_suite_is_discovered_and_default():
    assert suites()["latency"] is latency and latency.DEFAULT


def test_interleaving_rotates_the_order_and_runs_after_hooks():
    calls, after = [], []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    st = _timing.interleaved(fns, budget_s=0.0, min_reps=4, max_reps=4, after=after.append)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round
    assert calls[3:6] == ["a", "b", "c"] and calls[6:9] == ["b", "c", "a"] and calls[9:12] == ["c", "a", "b"]
    assert len(after) == len(calls) == 15 and {s.n for s in st.values()} == {4}


def test_stats_median_and_iqr():
    s = _timing.stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median == 3.0 and s.n == 5 and 0 < s.iqr < 100 and s.spread == s.iqr / 3.0


def test_a_branch_case_row():
    row = latency._branch_case(40, 24, 8, 3, budget_s=0.0)
    assert row["case"] == "branch-decode" and row["shape"] == "40x24" and row["tokens"] == 3
    assert row["ratio_vs_lora"] == row["lordba_s"] / row["lora_s"]
    assert row["lordba_mem_bytes"] == (8 * 40 + 24 * 8) // 8 + 4 * (40 + 8 + 24)
    assert row["lora_disk_bytes"] == 2 * 8 * 64 and row["path"] in ("sign", "torch")
    assert row["lordba_disk_bytes"] == (8 * 40 + 24 * 8) // 8 + 40 + 24 + 4 * 8  # int8 b, a; float32 m
    assert latency._branch_case(40, 24, 8, 100, budget_s=0.0)["case"] == "branch-prefill"


def test_unknown_or_unavailable_base_is_refused():
    with pytest.raises(ConfigError, match="--base must be one of"):
        _latency_model.quantized(torch.nn.Linear(2, 2), "gptq")
    model = torch.nn.Linear(2, 2)
    assert _latency_model.quantized(model, "none") is model


def test_a_run_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    def fake_models(ranks, base, quick):
        rows = []
        for case, tokens in (("model-prefill", 512), ("model-decode", 1)):
            rows.append(
                {"case": case, "shape": f"SmolLM2-135M base={base}", "r": 16, "tokens": tokens, "lordba_s": 1.0,
                 "lora_s": 1.02, "base_s": 0.9, "lordba_iqr_s": 0.01, "lora_iqr_s": 0.01, "base_iqr_s": 0.01,
                 "lordba_n": 5, "lora_n": 5, "base_n": 5, "ratio_vs_lora": 1.0 / 1.02, "overhead_lordba": 1.1,
                 "overhead_lora": 1.13, "lordba_mem_bytes": 10, "lora_mem_bytes": 100, "lordba_disk_bytes": 10,
                 "lora_disk_bytes": 90}
            )  # fmt: skip
        return rows

    monkeypatch.setattr(latency, "_model_rows", fake_models)
    monkeypatch.setattr(latency, "DEMO_SHAPES", [(24, 16)])
    monkeypatch.setattr(latency, "_branch_case", lambda i, o, r, t, b, real=latency._branch_case: real(i, o, r, t, 0.0))
    files = latency.run(tmp_path, quick=True)
    assert {f.name for f in files} == {"bench.json", "latency_meta.json", "bench.md", "latency_overhead.png"}
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["tokens"] for r in rows if r["case"].startswith("branch")] == [1, 16, 512]
    for row in rows:
        assert {"case", "r", "tokens", "lordba_s", "lora_s", "base_s", "ratio_vs_lora"} <= set(row)
    meta = json.loads((tmp_path / "latency_meta.json").read_text())
    assert meta["settings"]["base"] == "none" and "cpu" in meta["hardware"]
    assert "9.0× smaller" in (tmp_path / "bench.md").read_text()
