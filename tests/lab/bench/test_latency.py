"""The latency suite's machinery (never timings): interleaving, statistics, one real branch case,
the report and the files of a run with the slow parts replaced."""

import json
import statistics

import pytest
import torch

from lordba import ConfigError
from lordba_lab.bench import _latency_model, _timing, latency, suites


def test_the_suite_is_discovered_and_default():
    assert suites()["latency"] is latency and latency.DEFAULT


def test_interleaving_rotates_the_order_and_runs_after_hooks():
    calls, after = [], []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    st = _timing.interleaved(fns, budget_s=0.0, min_reps=4, max_reps=4, after=after.append)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up round
    assert calls[3:6] == ["a", "b", "c"] and calls[6:9] == ["b", "c", "a"] and calls[9:12] == ["c", "a", "b"]
    assert len(after) == len(calls) == 15 and {s.n for s in st.values()} == {4}


def test_runs_call_each_function_several_times_in_a_row_and_leave_out_the_first_call(monkeypatch):
    calls, after = [], []
    cost = {"a": [5.0, 1.0, 3.0], "b": [7.0, 2.0, 2.0]}  # seconds each call takes, per function, in turn
    made = {"a": 0, "b": 0}
    now = [0.0]

    def fn(name):
        calls.append(name)
        now[0] += cost[name][made[name] % 3]
        made[name] += 1

    monkeypatch.setattr(_timing.time, "perf_counter", lambda: now[0])
    got = _timing.timed_runs({n: (lambda n=n: fn(n)) for n in "ab"}, steps=3, reps=2, after=after.append)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # runs of 3, the order rotated
    assert len(after) == 12
    assert got == {"a": [2.0, 2.0], "b": [2.0, 2.0]}  # the median of calls 2-3 (1 and 3; 2 and 2), not the first's
    with pytest.raises(ValueError, match="at least 2 steps"):
        _timing.timed_runs({"a": lambda: None}, steps=1, reps=1)


def test_stats_median_and_iqr():
    s = _timing.stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median == 3.0 and s.n == 5 and 0 < s.iqr < 100 and s.spread == s.iqr / 3.0


def test_median_ci_is_the_binomial_order_statistic_interval():
    samples = [float(x) for x in range(100)]
    lo, hi = _timing.median_ci(samples[::-1])  # order does not matter
    assert (lo, hi) == (39.0, 60.0)  # the 40th and 61st of 100: P(40 <= Binomial(100, 1/2) <= 60) = 0.965
    assert lo <= statistics.median(samples) <= hi
    assert _timing.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few rounds: the whole range
    narrow = _timing.median_ci([1.0 + 0.001 * (k % 7) for k in range(400)])
    assert narrow[1] - narrow[0] <= 0.002  # many tight rounds: a tight interval


def test_median_ci_covers_the_median_at_least_95_percent_of_the_time():
    """The interval [x(r), x(n+1-r)] (1-based) covers the median with probability P(r <= B <= n - r),
    B ~ Binomial(n, 1/2): the interval is the narrowest such with at least 95%. The order statistics one
    rank inside n/2 -/+ z*sqrt(n)/2 on each side covered 92-94% (n = 8, 16, 31, 50, 100, 200, ...)."""
    import math

    def coverage(n, r):
        return sum(math.comb(n, i) for i in range(r, n - r + 1)) / 2**n

    for n in range(6, 301):
        lo, hi = _timing.median_ci([float(x) for x in range(n)])
        r = int(lo) + 1
        assert hi == n - r  # symmetric: x(r) and x(n+1-r)
        assert coverage(n, r) >= 0.95, n
        assert coverage(n, r + 1) < 0.95 or r + 1 > n - r - 1, n  # and no narrower one is


def test_paired_ratio_is_taken_round_by_round():
    a = _timing.stats([2.0, 4.0, 6.0, 8.0, 10.0])
    b = _timing.stats([1.0, 2.0, 3.0, 4.0, 5.0])
    ratio = _timing.paired_ratio(a, b)
    assert ratio.median == 2.0 and ratio.iqr == 0.0  # every round 2×, though each variant spreads 5×
    with pytest.raises(ValueError, match="interleaved"):
        _timing.paired_ratio(a, _timing.stats([1.0, 2.0]))


def test_prefill_profile_splits_adapted_layers_into_base_and_adapter(tiny_model):
    models = _latency_model.variants(tiny_model, 4, "none")
    rows = _latency_model.prefill_profile(models, prompt=12, reps=2)
    targets = [x["target"] for x in rows]
    assert targets == [*_latency_model.TARGETS, "all"]
    every = rows[-1]
    for name in ("lora", "lordba"):
        assert 0 < every[f"{name}_base_s"] < every[f"{name}_layer_s"] < every[f"{name}_model_s"]
        assert every[f"{name}_adapter_s"] > 0
        assert sum(x[f"{name}_layer_s"] for x in rows[:-1]) == pytest.approx(every[f"{name}_layer_s"], rel=0.5)
    assert every["adapter_ratio"] == every["lordba_adapter_s"] / every["lora_adapter_s"]
    for m in models.values():  # the timing hooks are gone
        assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_a_branch_case_row():
    row = latency._branch_case(40, 24, 8, 3, budget_s=0.0)
    assert row["case"] == "branch-decode" and row["shape"] == "40x24" and row["tokens"] == 3
    assert row["ratio_vs_lora"] == row["lordba_s"] / row["lora_s"]
    assert row["ratio_paired"] > 0 and row["ratio_paired_iqr"] >= 0
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
    def fake_models(ranks, base, quick, profile):
        profile.append(
            {"base": base, "r": 16, "target": "all", "lora_layer_s": 0.2, "lora_base_s": 0.15, "lora_adapter_s": 0.05,
             "lora_model_s": 1.0, "lordba_layer_s": 0.19, "lordba_base_s": 0.15, "lordba_adapter_s": 0.04,
             "lordba_model_s": 0.99, "adapter_ratio": 0.8}
        )  # fmt: skip
        rows = []
        for case, tokens in (("model-prefill", 512), ("model-decode", 1)):
            rows.append(
                {"case": case, "shape": f"SmolLM2-135M base={base}", "r": 16, "tokens": tokens, "lordba_s": 1.0,
                 "lora_s": 1.02, "base_s": 0.9, "lordba_iqr_s": 0.01, "lora_iqr_s": 0.01, "base_iqr_s": 0.01,
                 "lordba_n": 5, "lora_n": 5, "base_n": 5, "ratio_vs_lora": 1.0 / 1.02, "ratio_paired": 0.98,
                 "ratio_paired_iqr": 0.02, "overhead_lordba": 1.1,
                 "overhead_lora": 1.13, "lordba_mem_bytes": 10, "lora_mem_bytes": 100, "lordba_disk_bytes": 10,
                 "lora_disk_bytes": 90}
            )  # fmt: skip
        return rows

    monkeypatch.setattr(latency, "_model_rows", fake_models)
    monkeypatch.setattr(latency, "DEMO_SHAPES", [(24, 16)])
    monkeypatch.setattr(latency, "_branch_case", lambda i, o, r, t, b, real=latency._branch_case: real(i, o, r, t, 0.0))
    files = latency.run(tmp_path, quick=True)
    names = {"bench.json", "prefill_profile.json", "latency_meta.json", "bench.md", "latency_overhead.png"}
    assert {f.name for f in files} == names
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["tokens"] for r in rows if r["case"].startswith("branch")] == [1, 16, 512]
    for row in rows:
        assert {"case", "r", "tokens", "lordba_s", "lora_s", "base_s", "ratio_vs_lora"} <= set(row)
    meta = json.loads((tmp_path / "latency_meta.json").read_text())
    assert meta["settings"]["base"] == "q4" and "cpu" in meta["hardware"]
    md = (tmp_path / "bench.md").read_text()
    assert "9.0× smaller" in md and "Prefill profile" in md and "0.980 ± 0.010" in md
    assert json.loads((tmp_path / "prefill_profile.json").read_text())[0]["adapter_ratio"] == 0.8


def test_the_adapter_bytes_list_has_a_line_per_base_measured():
    """The full run times r=16 on the HQQ base and on the unquantized one: the list was keyed by rank, so the HQQ
    line (memory 10 / 100 B here) was replaced by the unquantized base's (12 / 100 B) and the report said the
    unquantized bytes under the HQQ rank; each variant measured has its line, named by its base."""

    def row(case, base, r, lordba_mem):
        return {"case": case, "shape": f"SmolLM2-135M base={base}", "r": r, "tokens": 1, "lordba_s": 1.0,
                "lora_s": 1.0, "base_s": 1.0, "lordba_iqr_s": 0.0, "lora_iqr_s": 0.0, "base_iqr_s": 0.0,
                "ratio_vs_lora": 1.0, "ratio_paired": 1.0, "ratio_paired_iqr": 0.0, "overhead_lordba": 1.0,
                "overhead_lora": 1.0, "lordba_mem_bytes": lordba_mem, "lora_mem_bytes": 100, "lordba_disk_bytes": 10,
                "lora_disk_bytes": 90}  # fmt: skip

    rows = [row(case, base, r, mem) for base, r, mem in (("hqq", 8, 5), ("hqq", 16, 10), ("none", 16, 12))
            for case in ("model-prefill", "model-decode")]  # fmt: skip
    meta = {"hardware": {"cpu": "x", "cores": 2, "torch_threads": 1, "torch": "2"}, "kernels": {},
            "settings": {"base": "hqq", "lordba_scale_dtype": "int8"}, "load_avg_before": [0.0],
            "load_avg_after": [0.0]}  # fmt: skip
    md = latency.report(rows, meta)
    lines = [line for line in md.splitlines() if line.startswith("- ")]
    assert lines == [
        "- SmolLM2-135M base=hqq, r=8: memory 5 / 100 B, disk 10 / 90 B (9.0× smaller)",
        "- SmolLM2-135M base=hqq, r=16: memory 10 / 100 B, disk 10 / 90 B (9.0× smaller)",
        "- SmolLM2-135M base=none, r=16: memory 12 / 100 B, disk 10 / 90 B (9.0× smaller)",
    ]
