"""The Triton kernels, checked on CPU through Triton's interpreter in a fresh process (and on a GPU
where there is one). The cases live in triton_cases.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SRC = str(HERE.parents[2] / "src")
TESTS = str(HERE.parents[1])

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="triton wheels exist for Linux only")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_triton_cases(device):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "LORDBA_TRITON_DEVICE": device}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        TESTS,
        str(HERE / "triton_cases.py"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_the_decode_rule_follows_the_measured_crossovers():
    from lordba.kernels import triton as tri

    # docs/results/gpu-h200: fused sign kernels up to 256 tokens at r ≤ 16, 16 at r = 64
    assert [tri.decode_max_tokens(r) for r in (1, 5, 16, 17, 32, 33, 64, 128)] == [256, 256, 256, 64, 64, 16, 16, 16]
