"""The CPU in the kernels' build key where there is no ``/proc/cpuinfo`` (macOS): a Mac sharing a kernel cache with
another CPU builds its own ``-march=native`` library instead of loading the other's."""

import os
import types

import pytest

from lordba.kernels import cpu
from lordba.kernels.cpu import build_probe

M1 = "hw.optional.arm.FEAT_FP16: 1\nhw.optional.arm.FEAT_BF16: 0\nhw.optional.arm.FEAT_I8MM: 0\nhw.optional.neon: 1"
M3 = "hw.optional.arm.FEAT_FP16: 1\nhw.optional.arm.FEAT_BF16: 1\nhw.optional.arm.FEAT_I8MM: 1\nhw.optional.neon: 1"


@pytest.fixture
def mac(monkeypatch, tmp_path):
    """This process as an Apple silicon Mac (no ``/proc/cpuinfo``, ``platform.processor()`` "arm"); returns a
    function that sets what ``sysctl`` answers (``None``: nothing) and gives the native build's key."""
    real_open = open

    def no_cpuinfo(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cpu, "open", no_cpuinfo, raising=False)
    monkeypatch.setattr(cpu, "openmp", lambda cxx: True)  # (no probe build)
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(build_probe, "sys", types.SimpleNamespace(platform="darwin"), raising=False)
    host = {"node": "Johns-MacBook-Pro.local"}
    fake_platform = types.SimpleNamespace(processor=lambda: "arm", node=lambda: host["node"])
    monkeypatch.setattr(build_probe, "platform", fake_platform, raising=False)
    monkeypatch.setattr(cpu.platform, "processor", lambda: "arm")  # (what the key held before: the same on every Mac)

    def key(brand, features, node="Johns-MacBook-Pro.local"):
        answers = {"machdep.cpu.brand_string": brand, "hw.optional": features}
        monkeypatch.setattr(build_probe, "_sysctl", lambda *args: answers[args[-1]], raising=False)
        host["node"] = node
        return cpu.extension_name("native")

    return key


def test_two_apple_silicon_macs_get_two_build_keys(mac):
    """``platform.processor()`` is "arm" on every Apple silicon Mac: an M1 and an M3 sharing one kernel cache (a
    synced home, a shared build cache) had one key, and the M1 loaded the M3's ``-march=native`` library (an illegal
    instruction). The key now holds ``sysctl``'s CPU brand and feature flags (``hw.optional``)."""
    m1 = mac("Apple M1", M1)
    assert mac("Apple M1", M1) == m1  # the same Mac: the same build
    assert mac("Apple M3", M3) != m1
    assert mac("Apple M3", M1) != m1  # another brand
    assert mac("Apple M1", M3) != m1  # other features


def test_a_mac_whose_sysctl_answers_nothing_never_takes_another_machines_build(mac):
    """Without ``sysctl``'s answer the CPU is unknown: the key holds this host's name and hardware address, so two
    such Macs never share a native build (nor one with a Mac whose CPU is known)."""
    first = mac(None, None, node="mac-a.local")
    assert mac(None, None, node="mac-a.local") == first
    assert mac(None, None, node="mac-b.local") != first
    assert mac("Apple M1", M1, node="mac-a.local") != first
    assert mac(None, M1, node="mac-a.local") == first  # a brand missing is unknown too


def test_sysctl_is_asked_with_its_arguments_and_none_when_it_fails(monkeypatch, tmp_path):
    """``_sysctl`` runs ``sysctl`` (found on ``PATH``) and gives its output; ``None`` where it fails."""
    if os.name != "posix":
        pytest.skip("needs sh")
    fake = tmp_path / "sysctl"
    fake.write_text('#!/bin/sh\n[ "$1" = "-n" ] && { echo "Apple M2 Pro"; exit 0; }\necho "unknown oid" >&2; exit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert build_probe._sysctl("-n", "machdep.cpu.brand_string") == "Apple M2 Pro"
    assert build_probe._sysctl("hw.optional") is None


Z14 = "vendor_id\t: IBM/S390\nfeatures\t: esan3 zarch stfle msa ldisp eimm dfp edat etf3eh te vx vxd vxe gs\n"
Z15 = Z14.replace(" gs\n", " gs vxe2 vxp sort dflt\n")
POWER9 = "processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\nclock\t\t: 2900.000000MHz\n"
POWER10 = POWER9.replace("POWER9", "POWER10")
RISCV_C910 = "processor\t: 0\nhart\t\t: 0\nisa\t\t: rv64imafdc\nmmu\t\t: sv39\nuarch\t\t: thead,c910\n"
RISCV_U74 = "processor\t: 0\nhart\t\t: 0\nisa\t\t: rv64imafdc\nmmu\t\t: sv39\nuarch\t\t: sifive,u74-mc\n"


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    """This process on a Linux machine whose ``/proc/cpuinfo`` says what the test gives; returns a function that
    sets it (and this host's name) and gives the native build's key."""
    fake = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(fake if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(cpu, "open", fake_open, raising=False)
    monkeypatch.setattr(cpu, "openmp", lambda cxx: True)  # (no probe build)
    monkeypatch.setenv("LORDBA_KERNEL_CACHE", str(tmp_path))
    host = {"node": "edge-a"}
    fake_platform = types.SimpleNamespace(processor=lambda: "", node=lambda: host["node"])
    monkeypatch.setattr(build_probe, "platform", fake_platform, raising=False)

    def key(text, node="edge-a"):
        fake.write_text(text)
        host["node"] = node
        return cpu.extension_name("native")

    return key


@pytest.mark.parametrize(
    "older,newer", [(Z14, Z15), (POWER9, POWER10), (RISCV_C910, RISCV_U74)], ids=["s390x", "power", "riscv"]
)
def test_two_cpus_of_one_other_architecture_get_two_build_keys(cpuinfo, older, newer):
    """s390x names its features in a lowercase ``features`` line, POWER its model in ``cpu``, RISC-V its ISA in ``isa``
    and its core in ``uarch``; the key read only ``flags`` / ``Features`` lines, so a z14 sharing a kernel cache with a
    z15 (a POWER9 with a POWER10) had one key and loaded the other's ``-march=native`` build."""
    first = cpuinfo(older)
    assert cpuinfo(older, node="edge-b") == first  # the same CPU on another host: one build
    assert cpuinfo(newer) != first


def test_a_cpuinfo_that_names_no_cpu_never_shares_a_native_build(cpuinfo):
    """Where ``/proc/cpuinfo`` holds none of the lines that name the CPU, the key holds this host (as on a Mac whose
    ``sysctl`` answers nothing)."""
    bare = "processor\t: 0\nBogoMIPS\t: 50.00\n"
    first = cpuinfo(bare)
    assert cpuinfo(bare) == first
    assert cpuinfo(bare, node="edge-b") != first


def test_x86_and_arm_keys_read_their_flags_line_only(cpuinfo):
    """On x86 and ARM the key is the ``flags`` / ``Features`` line as before (a cache built before stays valid), and
    another host with the same CPU shares the build."""
    x86 = "processor\t: 0\ncpu family\t: 6\nmodel name\t: Xeon\nflags\t\t: fpu sse2 avx2 avx512f\n"
    first = cpuinfo(x86)
    assert cpuinfo(x86, node="edge-b") == first
    assert cpuinfo(x86.replace("model name\t: Xeon", "model name\t: Other")) == first
    assert cpu.cpu_flags() == "flags\t\t: fpu sse2 avx2 avx512f\n"
