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
