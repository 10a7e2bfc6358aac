"""Building and loading the CPU extension, and the pure-PyTorch fallback when it cannot be built."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lordba.kernels import cpu

from conftest import refuse_directory_locks

SRC = str(Path(__file__).resolve().parents[3] / "src")
TESTS = str(Path(__file__).resolve().parents[2])


def run_python(code, timeout=600, **env):
    """Run ``code`` in a fresh interpreter (the op library can be loaded once per process)."""
    env = {**os.environ, "PYTHONPATH": SRC, **env}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


LOAD = textwrap.dedent(
    """
    import json, torch
    from lordba.kernels import cpu
    r = cpu.load()
    print(json.dumps({"ok": r.ok, "built": r.built, "path": str(r.path), "message": r.message,
                      "isa": torch.ops.lordba.isa() if r.ok else None}))
    """
)


def load_in_fresh_process(**env):
    return json.loads(run_python(LOAD, **env).strip().splitlines()[-1])


def test_build_directory_tracks_arch_cpu_and_location(monkeypatch, tmp_path):
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("LORDBA_CPU_ARCH", raising=False)
    native = cpu.extension_name()
    assert native.startswith("lordba_cpu_") and native.isidentifier()
    assert cpu.build_directory() == tmp_path / native
    if cpu.compiler() is not None:
        assert cpu.library_path("native") == tmp_path / native / f"{native}.so"
    assert cpu.extension_name("native") == native and cpu.extension_name("") != native
    monkeypatch.setenv("LORDBA_CPU_ARCH", "x86-64-v3")  # another -march: another build
    assert cpu.extension_name() not in (native, cpu.extension_name(""))
    monkeypatch.delenv("LORDBA_CPU_ARCH")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: "flags : fpu sse2")  # another CPU sharing the cache
    assert cpu.extension_name() != native


def test_a_compiler_upgraded_in_place_gets_its_own_build(monkeypatch, tmp_path):
    """The build keys (the kernels' and the bound calls') hold the compiler's version, not its path alone: a
    compiler upgraded in place (the same path; ninja sees only the path) kept loading the old compiler's
    library. The version is asked once per process (``--version``'s first line)."""
    from lordba.kernels.cpu import bound

    version = tmp_path / "version"
    version.write_text("c++ (Fake) 12.2.0")
    fake = tmp_path / "fake-c++"
    fake.write_text(f'#!/bin/sh\ncat "{version}"; echo; echo "Copyright"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path))
    forget = cpu.compiler_version.cache_clear  # what a new process starts with
    forget()
    try:
        old = cpu.extension_name(), bound.extension_name()
        version.write_text("c++ (Fake) 13.1.0")  # upgraded in place
        assert (cpu.extension_name(), bound.extension_name()) == old  # asked once per process
        forget()  # a new process
        new = cpu.extension_name(), bound.extension_name()
        assert new[0] != old[0] and new[1] != old[1]
        assert cpu.compiler_version(str(fake)) == "c++ (Fake) 13.1.0"
        assert cpu.compiler_version(str(tmp_path / "missing")) == ""  # no version: the path alone
    finally:
        forget()


def test_compiler_lookup(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu.compiler() is None
    monkeypatch.setenv("CXX", sys.executable)
    assert cpu.compiler() == shutil.which(sys.executable)


FAILING_CXX = """#!/bin/sh
for a in "$@"; do
  if [ "$a" = "-c" ]; then echo "branch.cpp:1:1: error: lordba-test-failure" >&2; exit 1; fi
done
exec c++ "$@"
"""

FAILURES = textwrap.dedent(
    """
    import os
    from lordba.kernels import cpu
    r = cpu.load(build=False)
    assert not r.ok and r.message == "not built yet" and not r.path.exists(), r
    r = cpu.load()
    assert not r.ok and not r.built and not r.path.exists(), r
    first, *rest = r.message.splitlines()
    sources = (
        "branch.cpp, sign_stages.cpp, sign_blocks.cpp, branch_rows.cpp, row_branch.cpp, q4.cpp, q4_gemm.cpp, "
        "q4_branch.cpp, q4_dot.cpp, attention.cpp, linear.cpp and prefill.cpp"
    )
    assert first == f"compiling {sources} with {os.environ['CXX']} failed:", first
    assert "lordba-test-failure" in r.message, r.message
    os.environ["CXX"] = "/nonexistent/c++"
    r = cpu.load()
    assert not r.ok and r.message.startswith("no C++ compiler found"), r
    print("failures ok")
    """
)


def test_a_failing_build_is_reported_not_raised(tmp_path):
    if shutil.which("c++") is None or os.name != "posix":
        pytest.skip("needs c++ and sh")
    fake = tmp_path / "failing-c++"
    fake.write_text(FAILING_CXX)
    fake.chmod(0o755)
    out = run_python(FAILURES, CXX=str(fake), LORDBA_KERNEL_CACHE=str(tmp_path / "cache"), LORDBA_CPU_ARCH="native")
    assert "failures ok" in out


MARCH_REFUSING_CXX = """#!/bin/sh
for a in "$@"; do
  case "$a" in -march=*) march="${a#-march=}";; -c) compile=1;; esac
done
if [ -n "$compile" ] && [ -n "$march" ]; then
  echo "cc1plus: error: bad value \u2018$march\u2019 for \u2018-march=\u2019 switch" >&2; exit 1
fi
if [ -n "$compile" ]; then echo "branch.cpp:1:1: error: lordba-test-without-march" >&2; exit 1; fi
exec c++ "$@"
"""

MARCH_REFUSED = textwrap.dedent(
    """
    from lordba.kernels import cpu
    r = cpu.load()
    assert not r.ok, r
    print(r.message)
    """
)


@pytest.mark.parametrize("arch", ["x86-64v3", None])
def test_an_arch_the_compiler_refuses_is_reported_not_replaced(tmp_path, arch):
    """``LORDBA_CPU_ARCH=x86-64v3`` (a typo of ``x86-64-v3``, which gcc refuses) built the kernels without
    ``-march`` instead, silently: the portable kernels where AVX2 ones were asked for. A refused ``native`` (the
    default) still falls back to a build without ``-march`` (here refused too: the fake compiler's own error)."""
    if shutil.which("c++") is None or os.name != "posix":
        pytest.skip("needs c++ and sh")
    fake = tmp_path / "march-c++"
    fake.write_text(MARCH_REFUSING_CXX)
    fake.chmod(0o755)
    env = {"CXX": str(fake), "LORDBA_KERNEL_CACHE": str(tmp_path / "cache"), "LORDBA_CPU_ARCH": arch or "native"}
    message = run_python(MARCH_REFUSED, **env)
    if arch:
        assert message.startswith("LORDBA_CPU_ARCH='x86-64v3': the compiler refuses -march=x86-64v3\n"), message
        assert "lordba-test-without-march" not in message, message
    else:
        assert "lordba-test-without-march" in message, message


def test_no_ext_switch(monkeypatch):
    monkeypatch.setenv("LORDBA_NO_EXT", "1")
    result = cpu.load()
    assert not result.ok and "LORDBA_NO_EXT" in result.message


def test_a_second_process_loads_the_cached_build():
    """With the default cache (normally built already by setup or an earlier test: then fast)."""
    if cpu.compiler() is None or os.environ.get("LORDBA_NO_EXT"):
        pytest.skip("no C++ compiler, or the extension is disabled")
    first = load_in_fresh_process()
    assert first["ok"], first["message"]
    second = load_in_fresh_process()
    assert second["ok"] and not second["built"] and second["message"] == "loaded from cache"
    assert second["path"] == first["path"] and second["isa"] == first["isa"]


INT8_OUTPUT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_q4_kernels import packed
    from lordba.kernels.q4 import int8_dot_available, q4_linear
    assert int8_dot_available(), torch.ops.lordba.isa()
    qweight, scale, minus, _ = packed(70, 600, 64, seed=5)
    x = torch.randn(1, 600, generator=torch.Generator().manual_seed(5)) * 3
    x[0, 7] = 40.0  # an outlier: a coarse step in its group
    torch.save(q4_linear(x, qweight, scale, minus, 600, int8_dot=True), sys.argv[1])
    """
)


@pytest.mark.long
def test_the_avx2_int8_kernel_gives_the_vnni_kernels_results_bit_for_bit(tmp_path):
    """``fast-int8``'s one-token kernel sums the same int32 products on AVX2 (``vpmaddubsw`` + ``vpmaddwd``) as on
    AVX512-VNNI (``vpdpbusd``), so a layer's output is the same bits on both builds."""
    if os.uname().machine != "x86_64" or "avx512_vnni" not in cpu.cpu_flags().split():
        pytest.skip("needs an x86-64 CPU with AVX512-VNNI for the native build")
    outs = {}
    for arch in ("native", "x86-64-v3"):
        path = tmp_path / f"{arch}.pt"
        proc = subprocess.run(
            [sys.executable, "-c", INT8_OUTPUT, str(path), str(Path(TESTS) / "kernels")],
            env={**os.environ, "PYTHONPATH": SRC, "LORDBA_CPU_ARCH": arch},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[arch] = torch.load(path)
    assert torch.equal(outs["native"], outs["x86-64-v3"])


@pytest.mark.slow
def test_concurrent_builds_a_stale_lock_and_another_arch_in_one_cache(tmp_path):
    if cpu.compiler() is None or os.uname().machine != "x86_64":
        pytest.skip("needs an x86-64 C++ compiler")
    env = {**os.environ, "PYTHONPATH": SRC, "LORDBA_KERNEL_CACHE": str(tmp_path), "LORDBA_CPU_ARCH": "native"}
    pipe = subprocess.PIPE
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=pipe, stderr=pipe, text=True) for _ in "ab"]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["ok"] for r in results), results
    assert sorted(r["built"] for r in results) == [False, True]  # one built, the other waited and loaded it
    native = Path(results[0]["path"])
    assert native == Path(results[1]["path"]) and native.parent.parent == tmp_path
    (native.parent / "lock").touch()  # cpp_extension's baton, as left by a build that was killed
    again = load_in_fresh_process(timeout=120, LORDBA_KERNEL_CACHE=str(tmp_path), LORDBA_CPU_ARCH="native")
    assert again["ok"] and not again["built"] and Path(again["path"]) == native
    v3 = load_in_fresh_process(LORDBA_KERNEL_CACHE=str(tmp_path), LORDBA_CPU_ARCH="x86-64-v3")
    assert v3["ok"] and v3["built"] and v3["isa"] == "avx2" and Path(v3["path"]).parent != native.parent
    again = load_in_fresh_process(LORDBA_KERNEL_CACHE=str(tmp_path), LORDBA_CPU_ARCH="native")
    assert not again["built"] and Path(again["path"]) == native  # each arch keeps its own build


FALLBACK = textwrap.dedent(
    """
    import sys, warnings
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import tiny_llama
    from lordba import LoRDBAConfig, get_lordba_model, kernels
    torch.manual_seed(3)
    ids = torch.randint(0, 101, (2, 7))
    with warnings.catch_warnings(record=True) as caught:  # the layers load the kernels when built
        warnings.simplefilter("always")
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=3, init="random"))
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


BUILD_TESTS = {
    # a build without AVX-512 or AVX2: the scalar paths (they found a NaN from a fully masked attention block
    # that only the portable paths produced)
    "x86-64": (
        "portable",
        ["cpu/test_attention_op.py", "cpu/test_cpu_op.py", "test_q4_kernels.py", "cpu/test_q4_group.py"],
    ),
    # AVX2 with FMA (laptops without AVX-512): the 4-bit rows' own AVX2 kernels, the branch inside their loop and
    # the decode attention's AVX2 loops
    "x86-64-v3": (
        "avx2",
        ["cpu/test_attention_op.py", "cpu/test_cpu_op.py", "test_q4_kernels.py", "cpu/test_q4_group.py"],
    ),
}


@pytest.mark.long
@pytest.mark.parametrize("arch", list(BUILD_TESTS))
def test_builds_for_other_cpus_pass_the_op_tests(arch):
    """A build for another ``-march`` runs the paths the native build never takes: the op tests must hold on
    it too. oneDNN is kept to AVX2 as on such a CPU (no bfloat16 GEMM)."""
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 -march values")
    isa, names = BUILD_TESTS[arch]
    env = {**os.environ, "LORDBA_CPU_ARCH": arch, "PYTHONPATH": SRC, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert load_in_fresh_process(LORDBA_CPU_ARCH=arch)["isa"] == isa
    tests = [str(Path(__file__).parent.parent / name) for name in names]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=TESTS)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-500:]


def test_every_included_header_is_in_the_build_key():
    """``q4_rows.h`` (included by q4.cpp, q4_gemm.cpp, linear.cpp and q4.h) was left out of HEADERS, whose bytes
    key the build: a library built before an edit of that header alone loaded as current."""
    import re

    folder = Path(cpu.__file__).parent
    included = {
        name
        for path in (*cpu.SOURCES, *folder.glob("*.h"))
        for name in re.findall(r'#include "([^"]+)"', path.read_text())
    }
    assert included and included <= {h.name for h in cpu.HEADERS}


@pytest.mark.parametrize("value,on", [("1", True), ("yes", True), ("0", False), ("false", False), ("", False)])
def test_the_off_switches_read_0_as_off(monkeypatch, value, on):
    """``LORDBA_NO_EXT=0`` turned the compiled kernels off (any non-empty value did), and ``LORDBA_NO_BOUND=0`` the
    bound calls; ``0``, ``false``, ``no``, ``off`` and empty leave them on."""
    monkeypatch.setenv("LORDBA_NO_EXT", value)
    assert cpu.env_switch("LORDBA_NO_EXT") is on
    assert (cpu.load(build=False).message == "disabled by LORDBA_NO_EXT") is on


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOLCK])
def test_a_build_directory_whose_file_system_refuses_locks_keeps_a_running_builds_baton(monkeypatch, tmp_path, code):
    """On NFS (a cluster's home: the kernel cache) ``locks.locked`` now runs its block unlocked where flock is
    refused, and ``_locked`` then deleted cpp_extension's baton as a killed build's: another node's build running
    there lost it, and two ninja builds wrote one library. Without the lock the build is refused as before (the
    pure-PyTorch fallback, the reason named) and the baton is kept."""
    refuse_directory_locks(monkeypatch, code)
    (tmp_path / "lock").touch()  # another machine's build, running
    with pytest.raises(OSError, match="LORDBA_KERNEL_CACHE"):
        with cpu._locked(tmp_path):
            pytest.fail("built without the directory's lock")
    assert (tmp_path / "lock").is_file()
