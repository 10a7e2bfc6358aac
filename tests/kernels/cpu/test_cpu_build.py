"""Building and loading the CPU extension, and the pure-PyTorch fallback when it cannot be built."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lordba.kernels import cpu

SRC = str(Path(__file__).resolve().parents[3] / "src")
TESTS = str(Path(__file__).resolve().parents[2])


def test_cache_key_tracks_arch_and_location(monkeypatch, tmp_path):
    if cpu.compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path))
    native = cpu.library_path()
    assert native.parent == tmp_path and native.name.startswith("lordba_cpu_")
    monkeypatch.setenv("LORDBA_CPU_ARCH", "x86-64-v3")
    assert cpu.library_path() != native


def test_compiler_lookup_and_a_failing_compiler_are_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu.compiler() is None
    target = tmp_path / "lib.so"
    error = cpu._compile("/bin/false", target)
    assert error and "status 1" in error and not target.exists() and not list(tmp_path.iterdir())


def test_no_ext_switch(monkeypatch):
    monkeypatch.setenv("LORDBA_NO_EXT", "1")
    result = cpu.load()
    assert not result.ok and "LORDBA_NO_EXT" in result.message


FALLBACK = textwrap.dedent(
    """
    import sys, warnings
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import tiny_llama
    from lordba import LoRDBAConfig, get_lordba_model, kernels
    torch.manual_seed(3)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random"))
    ids = torch.randint(0, 101, (2, 7))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            latent = lm(input_ids=ids).logits
            lm.pack()
            packed = lm(input_ids=ids).logits
    fallback = [w for w in caught if issubclass(w.category, kernels.KernelFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert "LORDBA_NO_EXT" in str(fallback[0].message)
    assert not kernels.cpu_available()
    assert torch.equal(latent, packed)
    print("fallback ok")
    """
)


@pytest.mark.slow
def test_fresh_process_fallback_warns_once_and_keeps_packed_equal_to_latent():
    env = {**os.environ, "LORDBA_NO_EXT": "1", "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", FALLBACK.format(tests=TESTS)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fallback ok" in proc.stdout


PORTABLE = textwrap.dedent(
    """
    import torch
    from lordba import kernels
    from lordba.core.packing import pack_signs
    assert kernels.cpu_available()
    isa = torch.ops.lordba.isa()
    for lead, in_f, out_f, r in [((1,), 576, 192, 16), ((3,), 21, 13, 3), ((2, 5), 40, 52, 9), ((4,), 64, 70, 64)]:
        x = torch.randn(*lead, in_f)
        A, B = torch.randn(r, in_f), torch.randn(out_f, r)
        b, m, a = torch.rand(in_f) + 0.5, torch.randn(r), torch.randn(out_f)
        want = (((x.double() * b.double()) @ torch.where(A >= 0, 1.0, -1.0).double().t()) * m.double())
        want = want @ torch.where(B >= 0, 1.0, -1.0).double().t() * a.double()
        for limit in (1 << 62, -1):
            got = torch.ops.lordba.branch(x, pack_signs(A), pack_signs(B), b, m, a, 1.0, limit, None)
            assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max(), (isa, lead, in_f, r, limit)
    print(isa)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("arch,isa", [("x86-64-v3", "avx2"), ("x86-64", "portable")])
def test_portable_builds_are_correct(arch, isa, tmp_path):
    if cpu.compiler() is None or os.uname().machine != "x86_64":
        pytest.skip("needs an x86-64 C++ compiler")
    env = {**os.environ, "LORDBA_CPU_ARCH": arch, "LORDBA_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", PORTABLE], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == isa
