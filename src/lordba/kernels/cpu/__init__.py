"""Build and load the compiled CPU kernels (``branch.cpp``) as the torch op ``torch.ops.lordba.branch``.

The source is compiled once per machine with the system C++ compiler (``$CXX``, else ``c++``/``g++``)
straight against the installed torch: no ninja, no pybind11, no Python headers. The shared library
is cached under ``$LORDBA_KERNEL_CACHE`` (default ``<lordba cache>/kernels``) under a key that covers
the source, the compiler, the flags, the torch version and the CPU's instruction-set flags (the code
is built with ``-march=native``), so an upgrade or another machine sharing the directory rebuilds
instead of loading a stale or illegal binary. Writes are atomic (temporary name, then rename), so
concurrent builds are safe.

``lordba build-kernels`` builds ahead of time; otherwise the first CPU call builds (about 15 s).
Set ``LORDBA_NO_EXT=1`` to skip the extension (the pure-PyTorch fallback runs instead), and
``LORDBA_CPU_ARCH`` to build for another ``-march`` than ``native`` (e.g. ``x86-64-v3``: AVX2 only,
which compiles the portable kernels).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("branch.cpp")
_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w")


@dataclass
class BuildResult:
    """Outcome of :func:`load`: the library path, or why the extension is unavailable."""

    ok: bool
    path: Path | None
    message: str
    built: bool = False  # compiled in this call (not loaded from the cache)


def cache_root() -> Path:
    """Where compiled libraries are kept: ``$LORDBA_KERNEL_CACHE`` or ``<lordba cache>/kernels``."""
    if os.environ.get("LORDBA_KERNEL_CACHE"):
        return Path(os.environ["LORDBA_KERNEL_CACHE"])
    from lordba._util.cachedir import cache_dir

    return cache_dir() / "kernels"


def compiler() -> str | None:
    """The C++ compiler to use: ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on ``PATH``."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _arch() -> str:
    return os.environ.get("LORDBA_CPU_ARCH", "native")


def _command(cxx: str, out: Path, native: bool) -> list[str]:
    tdir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    if native:
        cmd.append(f"-march={_arch()}")
    cmd += [f"-I{tdir / 'include'}", str(SOURCE), "-o", str(out)]
    cmd += [f"-L{tdir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{tdir / 'lib'}"]
    return cmd


def _key(cxx: str) -> str:
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        cxx.encode(),
        " ".join(_FLAGS).encode(),
        _arch().encode(),
        torch.__version__.encode(),
    ):
        h.update(part)
        h.update(b"\0")
    h.update(f"{platform.machine()} {_cpu_flags()} {torch.compiled_with_cxx11_abi()}".encode())
    return h.hexdigest()[:20]


def library_path() -> Path | None:
    """Path the compiled library has (or would have) on this machine; ``None`` without a compiler."""
    cxx = compiler()
    return None if cxx is None else cache_root() / f"lordba_cpu_{_key(cxx)}.so"


def _compile(cxx: str, target: Path) -> str | None:
    """Compile into ``target`` atomically; ``None`` on success, else the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for native in (True, False):  # -march=<arch> first; some compilers/targets lack it
        fd, tmp = tempfile.mkstemp(prefix=".lordba_cpu.", suffix=".so", dir=target.parent)
        os.close(fd)
        proc = subprocess.run(_command(cxx, Path(tmp), native), capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)
            return None
        Path(tmp).unlink(missing_ok=True)
        errors.append(proc.stderr.strip()[-2000:] or f"{cxx} exited with status {proc.returncode}")
    return errors[-1]


def load(build: bool = True) -> BuildResult:
    """Load the compiled kernels into torch, compiling them first if needed (and ``build``)."""
    if os.environ.get("LORDBA_NO_EXT"):
        return BuildResult(False, None, "disabled by LORDBA_NO_EXT")
    if hasattr(torch.ops.lordba, "branch"):
        return BuildResult(True, library_path(), "already loaded")
    cxx = compiler()
    if cxx is None:
        return BuildResult(False, None, "no C++ compiler found (set $CXX, or install g++)")
    path = library_path()
    built = False
    if not path.is_file():
        if not build:
            return BuildResult(False, path, "not built yet")
        error = _compile(cxx, path)
        if error is not None:
            return BuildResult(False, path, f"compiling {SOURCE.name} with {cxx} failed:\n{error}")
        built = True
    try:
        torch.ops.load_library(str(path))
    except OSError as err:
        return BuildResult(False, path, f"loading {path} failed: {err}")
    return BuildResult(True, path, "built" if built else "loaded from cache", built)
