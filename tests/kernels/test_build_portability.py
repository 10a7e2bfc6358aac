"""Building the CPU kernels with other compilers than this machine's g++: clang before 15 on ARM (Apple clang on M1
included), which refuses ``-march=native``; a compiler without OpenMP (Apple clang, clang without libomp)."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lordba.kernels import cpu
from lordba.kernels.cpu import build_probe

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parents[1])


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


# Apple clang (its driver refuses the flag); Debian's clang without libomp-dev fails on omp.h, then on -lomp
NO_OPENMP_CXX = """#!/bin/sh
for a in "$@"; do
  if [ "$a" = "-fopenmp" ]; then echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; fi
done
exec c++ "$@"
"""


def test_a_compiler_without_openmp_builds_the_kernels_without_it(monkeypatch, tmp_path):
    """A compiler that cannot build with ``-fopenmp`` (Apple clang; clang without libomp) failed every build: no
    kernels at all, the pure-PyTorch fallback. It is asked once (a tiny build) and the kernels are built without
    the flag (torch's parallel loops then run on one thread), in a build directory of their own."""
    fake = fake_compiler(tmp_path, "clang-no-openmp", NO_OPENMP_CXX)
    real = cpu.compiler()
    assert cpu.openmp(real) and not cpu.openmp(fake)
    assert "-fopenmp" in cpu.build_flags(real)[0] and "-fopenmp" in cpu.build_flags(real)[1]
    assert not any("-fopenmp" in f for f in (*cpu.build_flags(fake)[0], *cpu.build_flags(fake)[1]))
    calls = []

    def jit_load(directory, sources, cflags, cxx, *, ldflags=(), python_module=False):
        calls.append((directory, list(cflags), list(ldflags)))
        raise RuntimeError("not built in this test")

    monkeypatch.setattr(cpu, "jit_load", jit_load)
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", fake)
    with pytest.raises(RuntimeError, match="not built in this test"):
        cpu._build_and_load(fake, "native")
    directory, cflags, ldflags = calls[0]
    assert "-fopenmp" not in cflags + ldflags and "-march=native" in cflags and "-O3" in cflags
    assert directory == cpu.build_directory("native")
    wrapped = cpu.extension_name("native")
    monkeypatch.setattr(cpu, "openmp", lambda cxx: True)  # the same compiler once its OpenMP is installed
    assert cpu.extension_name("native") != wrapped


LOGITS = textwrap.dedent(
    """
    import logging, sys, torch
    sys.path.insert(0, {tests!r})
    logging.basicConfig(level=logging.WARNING)
    from conftest import tiny_q4
    from lordba import kernels
    model = tiny_q4(adapter=True)
    ids = torch.randint(0, 101, (1, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = {{"prompt": model(input_ids=ids).logits, "token": model(input_ids=ids[:, :1]).logits}}
    out["kernels"] = kernels.cpu_available()
    torch.save(out, sys.argv[1])
    """
)


@pytest.mark.slow
def test_the_kernels_built_without_openmp_give_the_references_logits(tmp_path):
    """The whole build with a compiler that refuses ``-fopenmp`` (several minutes): the kernels load, say once that
    they run on one thread, and the tiny q4 model with a packed adapter gives the pure-PyTorch reference's logits."""
    fake = fake_compiler(tmp_path, "clang-no-openmp", NO_OPENMP_CXX)
    if os.uname().machine != "x86_64":
        pytest.skip("the fake compiler wraps this machine's c++")
    code = LOGITS.format(tests=TESTS)
    outs = {}
    for name, env in (("built", {"CXX": fake}), ("reference", {"LORDBA_NO_EXT": "1"})):
        path = tmp_path / f"{name}.pt"
        env = {**os.environ, "PYTHONPATH": SRC, "LORDBA_KERNEL_CACHE": str(tmp_path / "cache"), **env}
        proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = torch.load(path)
        if name == "built":
            assert proc.stderr.count("cannot build with OpenMP (-fopenmp)") == 1, proc.stderr[-3000:]
    assert outs["built"]["kernels"] and not outs["reference"]["kernels"]
    for key in ("prompt", "token"):
        torch.testing.assert_close(outs["built"][key], outs["reference"][key], rtol=0, atol=1e-4)


GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
"""
SAPPHIRE_RAPIDS = (
    "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\nbugs\t\t: spectre_v1\n"
)


@pytest.mark.parametrize("cpuinfo,native", [(GRAVITON3, False), (SAPPHIRE_RAPIDS, True)])
def test_native_bfloat16_reads_x86_flags_only(monkeypatch, tmp_path, cpuinfo, native):
    """ARM's ``bf16`` (here a Graviton 3's ``Features`` line) keeps the float32 prefill: the bfloat16 GEMM there is
    torch's own, never measured (see ``native_bfloat16``'s docstring); an x86 CPU with AVX512_BF16 takes it."""
    from lordba.kernels import q4

    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(fake if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(cpu, "open", fake_open, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    q4.native_bfloat16.cache_clear()
    try:
        assert cpu.cpu_flags().split()[0] == ("Features" if cpuinfo is GRAVITON3 else "flags")
        assert q4.native_bfloat16() is native
    finally:
        q4.native_bfloat16.cache_clear()


NO_COMPILER = textwrap.dedent(
    """
    from lordba.kernels import cpu
    r = cpu.load()
    assert not r.ok and r.path is None, r
    print(r.message)
    """
)


@pytest.mark.parametrize("value", ["ccache g++", "/nonexistent/clang++"])
def test_a_cxx_that_names_no_executable_is_named(value):
    """``CXX="ccache g++"`` (a launcher before the compiler, which ninja's own builds take) was reported as "no C++
    compiler found (set $CXX, or install g++)", with $CXX set: the message now names the value."""
    message = run_python(NO_COMPILER, CXX=value, LORDBA_NO_EXT="")
    assert message.startswith("no C++ compiler found ("), message
    assert f"$CXX={value!r} names no executable" in message, message


def test_no_usable_temporary_directory_keeps_the_build_key_and_raises_nothing(monkeypatch):
    """The OpenMP probe builds in a temporary directory; where none can be made (a read-only root file system, a
    full /tmp) it raised out of ``extension_name`` (so out of ``load`` and every forward's kernel check), although
    loading a library built before needs no temporary file. Where it cannot ask, the flag stays (the key as before)."""
    real = cpu.compiler()
    if real is None:
        pytest.skip("needs a C++ compiler")
    cpu.openmp.cache_clear()
    name = cpu.extension_name("native")

    def no_tmp(*args, **kwargs):
        raise FileNotFoundError("No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp', '/']")

    monkeypatch.setattr(build_probe.tempfile, "TemporaryDirectory", no_tmp)
    cpu.openmp.cache_clear()
    try:
        assert cpu.extension_name("native") == name
        assert "-fopenmp" in cpu.build_flags(real)[0]
    finally:
        cpu.openmp.cache_clear()


# a compiler whose probe build fails for a reason that is not OpenMP's, and one that logs each -fopenmp build
DISK_FULL_CXX = """#!/bin/sh
echo "/usr/bin/ld: final link failed: No space left on device" >&2; exit 1
"""
LOGGING_CXX = """#!/bin/sh
for a in "$@"; do [ "$a" = "-fopenmp" ] && echo probe >> "$(dirname "$0")/probes.log"; done
exec c++ "$@"
"""


def test_a_probe_failing_for_another_reason_keeps_openmp(monkeypatch, tmp_path):
    """Any failed probe build meant "no OpenMP": a full disk while writing the probe's library changed a g++ user's
    build key and built single-threaded kernels. Only a failure whose output names OpenMP (``omp.h``, ``-lomp``,
    ``-fopenmp``) counts."""
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path / "cache"))
    fake = fake_compiler(tmp_path, "g++-disk-full", DISK_FULL_CXX)
    cpu.openmp.cache_clear()
    try:
        assert cpu.openmp(fake)
        assert not cpu.openmp(fake_compiler(tmp_path, "clang-no-openmp", NO_OPENMP_CXX))
    finally:
        cpu.openmp.cache_clear()


def test_a_compiler_that_builds_with_openmp_is_probed_once_per_version(monkeypatch, tmp_path):
    """The probe compiled a library in every process that loaded the kernels (45 ms with g++ on a quiet machine,
    more on a small device); a yes is now remembered in the kernel cache, per compiler path and version."""
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path / "cache"))
    fake = fake_compiler(tmp_path, "g++-logged", LOGGING_CXX)
    cpu.openmp.cache_clear()
    try:
        assert cpu.openmp(fake)
        cpu.openmp.cache_clear()  # (a new process)
        assert cpu.openmp(fake)
    finally:
        cpu.openmp.cache_clear()
    assert (tmp_path / "probes.log").read_text().splitlines() == ["probe"]
