"""Where the CPU kernels cannot be built for want of a Python package, the pure-PyTorch fallback runs and says why."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")

NO_SETUPTOOLS = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["setuptools"] = None  # a venv without setuptools: uv's, Python 3.12's own
    from lordba import kernels
    from lordba.kernels import cpu
    r = cpu.load()
    assert not r.ok, r
    print(r.message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.cpu_available()
    print([str(w.message) for w in caught if issubclass(w.category, kernels.KernelFallbackWarning)])
    """
)


def test_a_venv_without_setuptools_falls_back_and_names_it(tmp_path):
    """``torch.utils.cpp_extension`` imports ``setuptools``, which torch required only from Python 3.12 on and a uv
    venv does not have: ``ModuleNotFoundError: No module named 'setuptools'`` escaped ``cpu.load`` and the first CPU
    layer's preload (building a model failed) instead of the fallback with its warning."""
    env = {**os.environ, "PYTHONPATH": SRC, "LORDBA_KERNEL_CACHE": str(tmp_path), "LORDBA_NO_EXT": ""}
    proc = subprocess.run([sys.executable, "-c", NO_SETUPTOOLS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, warned = proc.stdout.strip().splitlines()[-2:]
    assert message.startswith("torch.utils.cpp_extension cannot be imported ("), message
    assert message.endswith("pip install setuptools"), message
    assert "compiled CPU kernels unavailable (torch.utils.cpp_extension cannot be imported" in warned, warned
