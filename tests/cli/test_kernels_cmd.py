import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lordba import kernels
from lordba.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")
BUILT = re.compile(r"^CPU kernels: (built|loaded from cache|already loaded) in \d+\.\d s \((\w+)\): (\S+\.so)$", re.M)


def test_build_kernels_reports_what_runs(capsys):
    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernels:" in out and "Triton (GPU) kernels:" in out
    if kernels.cpu_available():
        found = BUILT.search(out)
        assert found, out
        assert Path(found.group(3)).is_file()
        from lordba.kernels.q4 import amx_prefill_available

        amx = "adapter prefill on the tile unit (AMX) " + ("yes" if amx_prefill_available() else "no")
        assert "  4-bit base: bfloat16 prefill GEMM" in out and amx in out, out


@pytest.fixture
def no_extension(monkeypatch):
    """As in a process where the extension cannot be built (restored afterwards)."""
    monkeypatch.setenv("LORDBA_NO_EXT", "1")
    monkeypatch.setattr(kernels._STATE, "cpu", None)
    yield


def test_build_kernels_without_a_build_exits_0_or_3_with_strict(no_extension, capsys):
    assert main(["build-kernels"]) == 0
    assert "NOT available" in capsys.readouterr().out
    kernels._STATE.cpu = None
    assert main(["build-kernels", "--strict"]) == 3
    assert "could not be built" in capsys.readouterr().err


def build_kernels(cache, *args):
    code = f"from lordba.cli import main; raise SystemExit(main(['build-kernels', *{list(args)!r}]))"
    env = {**os.environ, "PYTHONPATH": SRC, "LORDBA_KERNEL_CACHE": str(cache)}
    env.pop("LORDBA_NO_EXT", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = BUILT.search(proc.stdout)
    assert found, proc.stdout + proc.stderr[-3000:]
    return found.group(1), found.group(3)


@pytest.mark.slow
def test_build_kernels_builds_once_then_loads_the_cache_and_force_rebuilds(tmp_path):
    from lordba.kernels import cpu

    if cpu.compiler() is None:
        pytest.skip("no C++ compiler")
    first, path = build_kernels(tmp_path)
    assert first == "built" and Path(path).is_relative_to(tmp_path)
    assert build_kernels(tmp_path) == ("loaded from cache", path)
    assert build_kernels(tmp_path, "--force") == ("built", path)


def test_force_cleans_the_kernels_and_the_bound_calls_then_builds(monkeypatch, capsys):
    from lordba.kernels import cpu
    from lordba.kernels.cpu import bound

    cleaned = []
    monkeypatch.setattr(cpu, "clean", lambda: cleaned.append("kernels"))
    monkeypatch.setattr(bound, "clean", lambda: cleaned.append("bound"))
    assert main(["build-kernels", "--force"]) == 0
    assert cleaned == ["kernels", "bound"] and "CPU kernels:" in capsys.readouterr().out
