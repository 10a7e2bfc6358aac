"""Building the CPU kernels with other compilers than this machine's g++: clang before 15 on ARM (Apple clang on M1
included), which refuses ``-march=native``."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_python(code, timeout=600, **env):
    """Run ``code`` in a fresh interpreter (the op library can be loaded once per process)."""
    env = {**os.environ, "PYTHONPATH": SRC, **env}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def fake_compiler(tmp_path, name, script):
    if shutil.which("c++") is None or os.name != "posix":
        pytest.skip("needs c++ and sh")
    fake = tmp_path / name
    fake.write_text(script)
    fake.chmod(0o755)
    return str(fake)


# clang before 15 on ARM (Apple clang 14 on an M1, Ubuntu 22.04's clang 14 on Graviton): the driver's own error
CLANG_NO_NATIVE_CXX = """#!/bin/sh
for a in "$@"; do
  case "$a" in -march=native) native=1;; -c) compile=1;; esac
done
if [ -n "$native" ]; then echo "clang: error: the clang compiler does not support '-march=native'" >&2; exit 1; fi
if [ -n "$compile" ]; then echo "branch.cpp:1:1: error: lordba-test-without-march" >&2; exit 1; fi
exec c++ "$@"
"""

LOAD_FAILS = textwrap.dedent(
    """
    from lordba.kernels import cpu
    r = cpu.load()
    assert not r.ok, r
    print(r.message)
    """
)


def test_a_clang_that_refuses_march_native_builds_without_it(tmp_path):
    """Apple clang before 15 (and clang before 15 on any ARM CPU) says "the clang compiler does not support
    '-march=native'", which the loader did not take for a refused ``-march``: no kernels at all (the pure-PyTorch
    fallback) instead of the build without ``-march`` that a refused ``native`` gets. Here the build without it
    fails with the fake compiler's own error, which shows it was tried."""
    fake = fake_compiler(tmp_path, "clang-14-arm", CLANG_NO_NATIVE_CXX)
    env = {"CXX": fake, "LORDBA_KERNEL_CACHE": str(tmp_path / "cache"), "LORDBA_CPU_ARCH": "native"}
    message = run_python(LOAD_FAILS, **env)
    assert "lordba-test-without-march" in message, message
    assert "does not support '-march=native'" not in message, message
