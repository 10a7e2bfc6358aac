"""What the build of the CPU kernels (:mod:`lordba.kernels.cpu`) asks of the machine: the C++ compiler
(:func:`compiler`) and its version (:func:`compiler_version`, in the build keys), whether it builds with OpenMP
(:func:`openmp`: a tiny build once per compiler version, a yes remembered in the kernel cache) and the flags that
follow (:func:`build_flags`), and whether a failed build's output is the compiler refusing the ``-march`` value
(:func:`refuses_march`: the default ``native`` then builds without it); and, where there is no ``/proc/cpuinfo``,
the CPU in the build key (:func:`cpu_identity`: on macOS its brand and feature flags, from ``sysctl``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

_CFLAGS = ("-O3", "-std=c++20", "-fopenmp", "-w", "-ffp-contract=off")
_LDFLAGS = ("-fopenmp",)
# what torch's headers need of OpenMP under -fopenmp (ATen/ParallelOpenMP.h includes omp.h), built as the library is
_OPENMP_PROBE = "#include <omp.h>\nint lordba_openmp_probe() { return omp_get_max_threads(); }\n"
# the compiler's complaint about the -march value itself (gcc, clang; "does not support '-march=native'": clang
# before 15 on ARM, Apple clang on M1 and later included); the ninja log always has "-march"
_BAD_MARCH = re.compile(
    r"-march=.{0,3} switch|(unrecognized|unsupported)[^\n]{0,30}-march|unknown target CPU|does not support '-march"
)


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on ``PATH``;
    ``None`` if there is none (or ``$CXX`` names no executable)."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.cache
def compiler_version(path: str) -> str:
    """The first line of ``path --version`` (``""`` where it gives none), asked once per process: in the build
    keys, since ninja sees the compiler's path alone (a compiler upgraded in place, the same path, kept loading
    the library the old one built)."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return next(iter(proc.stdout.splitlines()), "").strip()


def compiler_key() -> str:
    """The compiler in the build keys: its path (:func:`compiler`) and version (:func:`compiler_version`)."""
    cxx = compiler()
    return f"{cxx}\0{compiler_version(cxx)}" if cxx else ""


@functools.cache
def openmp(cxx: str) -> bool:
    """Whether ``cxx`` builds a shared library with ``-fopenmp`` (a tiny build, once per compiler version: a yes is
    remembered in the kernel cache): Apple clang refuses the flag, and clang without its OpenMP runtime (Debian's
    ``libomp-dev``) has no ``omp.h``. Where it cannot, the kernels are built without it (:func:`build_flags`):
    torch's ``at::parallel_for`` then runs their loops on the calling thread (torch's OpenMP build), correct but on
    one core. True where the probe learns nothing of OpenMP (no usable temporary directory, a failure whose output
    names no OpenMP, e.g. a full disk): the flag stays, as before the probe (the build key unchanged)."""
    from lordba.kernels.cpu import cache_root

    known = cache_root() / "openmp" / hashlib.sha256(f"{cxx}\0{compiler_version(cxx)}".encode()).hexdigest()[:16]
    if known.is_file():
        return True
    try:
        with tempfile.TemporaryDirectory(prefix="lordba-openmp-") as tmp:
            source = Path(tmp) / "probe.cpp"
            source.write_text(_OPENMP_PROBE)
            cmd = [cxx, "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(Path(tmp) / "probe.so")]
            try:
                proc = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
            except (OSError, subprocess.SubprocessError):
                return False
    except OSError:  # the temporary directory (made or written): nothing learned of the compiler
        return True
    if proc.returncode and re.search(rb"omp|openmp", proc.stdout + proc.stderr, re.IGNORECASE):
        return False
    with contextlib.suppress(OSError):
        known.parent.mkdir(parents=True, exist_ok=True)
        known.touch()
    return True


def build_flags(cxx: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The compile and link flags of the kernels' library with ``cxx`` (``-march`` aside): ``-fopenmp`` where
    :func:`openmp`."""
    if openmp(cxx):
        return _CFLAGS, _LDFLAGS
    return tuple(f for f in _CFLAGS if f != "-fopenmp"), tuple(f for f in _LDFLAGS if f != "-fopenmp")


def refuses_march(message: str) -> bool:
    """Whether a failed build's ``message`` (:func:`lordba.kernels.cpu.load`'s, with the compiler's output) is the
    compiler refusing the ``-march`` value itself, not the code."""
    return _BAD_MARCH.search(message) is not None


def _sysctl(*args: str) -> str | None:
    """``sysctl args``' output (macOS), or ``None`` where it cannot be run, fails or says nothing."""
    exe = shutil.which("sysctl") or "/usr/sbin/sysctl"  # (not on a PATH of /usr/bin:/bin alone)
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def cpu_identity() -> str:
    """The CPU in the build key where there is no ``/proc/cpuinfo`` (:func:`lordba.kernels.cpu.cpu_flags`).

    On macOS its brand (``machdep.cpu.brand_string``: "Apple M1", "Apple M3 Pro", an Intel model) and its feature
    flags (``hw.optional``: ``hw.optional.arm.FEAT_*`` on Apple silicon, ``hw.optional.avx512f`` ... on Intel):
    ``platform.processor()`` is "arm" on every Apple silicon Mac, so two Macs sharing a kernel cache loaded each
    other's ``-march=native`` build (an M1 an M3's: an illegal instruction). Where ``sysctl`` answers nothing,
    this host's name and hardware address, so that no other machine's native build is loaded. Elsewhere (Windows)
    ``platform.processor()``, which names the model."""
    if sys.platform != "darwin":
        return platform.processor()
    brand, features = _sysctl("-n", "machdep.cpu.brand_string"), _sysctl("hw.optional")
    if brand is None or features is None:
        return unknown_cpu()
    return f"{brand}\n{features}"


def unknown_cpu() -> str:
    """A build key's CPU where nothing names it: this host's name and hardware address, so that no other machine's
    ``-march=native`` build is ever loaded (at the cost of one build per host sharing a cache)."""
    return f"{platform.processor()} (CPU unknown) on {platform.node()} {uuid.getnode():012x}"
