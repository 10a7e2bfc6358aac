"""The gpu suite's parts that run without a GPU: its refusal on a machine without one, its timing
loop (wall clock here, CUDA events there), its report; and, behind ``-m slow``, the whole suite on
tiny shapes through Triton's interpreter. Its measurements are in docs/results/gpu-h200/."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lordba import kernels
from lordba.errors import LoRDBAError
from lordba_lab.bench import gpu, suites
from lordba_lab.bench._gpu_timing import interleaved_gpu

ROOT = Path(__file__).resolve().parents[3]


def test_the_suite_is_discovered_and_not_default():
    assert suites()["gpu"] is gpu and not gpu.DEFAULT


def test_without_a_gpu_the_suite_says_what_it_needs(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(LoRDBAError, match="CUDA GPU and triton"):
        gpu.run(tmp_path, quick=True)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_timing_counts_calls_and_divides_by_the_calls_a_replay_stands_for():
    calls = {"one": 0, "batch": 0}

    def one():
        calls["one"] += 1
        time.sleep(0.002)

    def batch():  # stands for 3 calls, as a CUDA graph of 3 captured calls does
        calls["batch"] += 1
        time.sleep(0.006)

    timed = interleaved_gpu({"one": one, "batch": batch}, rounds=4, calls=6, per_round={"batch": 3})
    assert calls == {"one": 1 + 4 * 6, "batch": 1 + 4 * 2}  # one warm-up each, then 6 calls' worth a round
    assert timed["one"].n == timed["batch"].n == 4
    ratio = timed["batch"].median / timed["one"].median
    assert 0.5 < ratio < 2.0, ratio  # both ~2 ms per call


def test_a_run_records_its_settings_in_the_json(tmp_path, monkeypatch):
    """gpu.json's meta held the hardware, triton's version and the errors, not the run's settings: a --quick run
    (medians of 8 rounds) read like a full one (15), and a smoke run's cases like a real one's."""
    monkeypatch.setattr(gpu, "_branch_case", lambda *cell: [])  # no timing: the plumbing only
    gpu.run(tmp_path, quick=True, device="cpu", parts=("branch",))
    settings = json.loads((tmp_path / "gpu.json").read_text())["meta"]["settings"]
    assert settings["quick"] is True and settings["device"] == "cpu" and settings["parts"] == ["branch"]
    assert settings["rounds"] == 3 and settings["ranks"] == [16] and settings["model_rank"] == 16


def test_the_report_writes_a_table_json_and_plot(tmp_path):
    branch = {"case": "branch", "in": 8, "out": 4, "r": 16, "mode": "eager", "base_us": 3.0}
    rows = [{**branch, "tokens": t, **{f"{v}_x": 1.0 + t / 100 for v in gpu.VARIANTS[1:]}} for t in (1, 16)]
    rows.append(
        {
            "case": "decode 1×512",
            "model": "m",
            "mode": "graph",
            "base_ms": 3.3,
            "lora_x": 1.5,
            "lordba_x": 1.3,
            "lordba_vs_lora": 0.87,
            "check": None,
        }
    )
    files = gpu._report(rows, {"m build": "boom"}, tmp_path)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["errors"] == {"m build": "boom"}
    md = (tmp_path / "gpu.md").read_text()
    assert "| 8→4 | 16 | 16 | eager |" in md and "| m | decode 1×512 | graph |" in md
    assert {f.name for f in files} == {"gpu.json", "gpu.md", "gpu_overhead.png"}


@pytest.mark.slow
def test_the_whole_suite_runs_through_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "lab")])}
    cmd = [sys.executable, "-m", "lordba_lab.bench.gpu", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert not saved["meta"]["errors"]
    models = [r for r in saved["rows"] if r["case"] != "branch"]
    assert len(models) == 4 and models[0]["check"] < 1e-4


def test_the_markdown_names_the_hardware_and_the_failed_cases(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "hardware", lambda: {"cpu": "Test CPU", "cuda": "NVIDIA Test GPU"})
    row = {"case": "decode 1×512", "model": "m", "mode": "eager", "base_ms": 3.3, "lora_x": 1.5, "lordba_x": 1.3,
           "lordba_vs_lora": 0.87, "check": None}  # fmt: skip
    gpu._report([row], {"m prefill 4×512": "Traceback ...\nRuntimeError: CUDA out of memory"}, tmp_path)
    md = (tmp_path / "gpu.md").read_text()
    assert "NVIDIA Test GPU" in md  # absolute times (base ms) come with the GPU they were measured on
    assert "m prefill 4×512" in md and "FAILED" in md and "CUDA out of memory" in md  # not silently missing
