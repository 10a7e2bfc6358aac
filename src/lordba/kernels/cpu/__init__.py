"""Build and load the compiled CPU kernels (``branch.cpp``) as the torch ops ``torch.ops.lordba.branch``
and ``torch.ops.lordba.isa``.

The source is compiled once per machine by :func:`torch.utils.cpp_extension.load` (ninja, the system
C++ compiler: ``$CXX``, else ``c++``/``g++``/``clang++``) into its own build directory under
``$LORDBA_KERNEL_CACHE`` (default ``<lordba cache>/kernels``), and loaded as a plain op library (it
registers its ops with ``TORCH_LIBRARY``; there is no Python module). ninja rebuilds when the source,
a header, the flags, the compiler's path or the torch installation change. What it cannot see, the
``-march`` value, the CPU's instruction-set flags (the code is built with ``-march=native``) and the
compiler's version (:func:`compiler_version`), is in the extension's name (:func:`extension_name`), so
another machine sharing the directory builds its own library instead of loading an illegal one (and a
compiler upgraded in place builds anew). Concurrent builds are serialized by a ``flock`` on the build
directory (:func:`lordba._util.locks.locked`: released even if a build is killed), around cpp_extension's
own baton. What the build asks of the compiler (its name and version, OpenMP, a refused ``-march``) is in
:mod:`.build_probe`.

``lordba build-kernels`` builds ahead of time; otherwise the first CPU call builds (about 10-20 s).
Set ``LORDBA_NO_EXT=1`` to skip the extension (the pure-PyTorch fallback runs instead), and
``LORDBA_CPU_ARCH`` to build for another ``-march`` than ``native`` (e.g. ``x86-64-v3``: AVX2 only,
which compiles the portable kernels; a value the compiler refuses fails the build, naming the variable, where a
refused ``native`` builds without ``-march``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lordba._util.locks import locked
from lordba.kernels.cpu.build_probe import (
    build_flags,
    compiler,
    compiler_key,
    compiler_version,  # noqa: F401  (re-exported)
    cpu_identity,
    openmp,
    refuses_march,
    unknown_cpu,
)

SOURCE = Path(__file__).with_name("branch.cpp")
# one library: the sign branch, the 4-bit base, decode attention, dense layer + branch, the prefill's tile-unit
# input pass (headers: part of the build key)
SOURCES = (
    SOURCE,
    Path(__file__).with_name("sign_stages.cpp"),
    Path(__file__).with_name("sign_blocks.cpp"),
    Path(__file__).with_name("branch_rows.cpp"),
    Path(__file__).with_name("row_branch.cpp"),
    Path(__file__).with_name("q4.cpp"),
    Path(__file__).with_name("q4_gemm.cpp"),
    Path(__file__).with_name("q4_branch.cpp"),
    Path(__file__).with_name("q4_dot.cpp"),
    Path(__file__).with_name("attention.cpp"),
    Path(__file__).with_name("linear.cpp"),
    Path(__file__).with_name("prefill.cpp"),
)
# every header beside the sources: each is in the build key (a header left out, q4_rows.h once, let a library
# built before its edit load as current)
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
_loaded: Path | None = None  # the library this process loaded


@dataclass
class BuildResult:
    """Outcome of :func:`load`: the library path, or why the extension is unavailable."""

    ok: bool
    path: Path | None
    message: str
    built: bool = False  # compiled in this call (not loaded from the cache)


def cache_root() -> Path:
    """Where builds are kept: ``$LORDBA_KERNEL_CACHE`` or ``<lordba cache>/kernels``."""
    if os.environ.get("LORDBA_KERNEL_CACHE"):
        return Path(os.environ["LORDBA_KERNEL_CACHE"])
    from lordba._util.cachedir import cache_dir

    return cache_dir() / "kernels"


def cpu_flags() -> str:
    """This CPU's instruction-set flags line (``/proc/cpuinfo``'s ``flags`` on x86, ``Features`` on ARM; on other
    machines its ``features`` / ``isa`` / ``uarch`` / ``cpu`` lines: s390x, RISC-V, POWER); where there is none
    of these, this host (:func:`.build_probe.unknown_cpu`); without ``/proc/cpuinfo``, :func:`.build_probe.cpu_identity`
    (on macOS its brand and feature flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines(keepends=True)
    except OSError:
        return cpu_identity()
    flags = next((line for line in lines if line.startswith(("flags", "Features"))), None)
    if flags is not None:
        return flags
    first: dict[str, str] = {}
    for line in lines:
        first.setdefault(line.partition(":")[0].strip().lower(), line)
    identity = "".join(first[key] for key in _IDENTITY_KEYS if key in first)
    return identity or unknown_cpu()


_IDENTITY_KEYS = ("features", "isa", "uarch", "cpu")  # s390x; RISC-V; RISC-V; POWER


def _arch() -> str:
    return os.environ.get("LORDBA_CPU_ARCH", "native")


def extension_name(arch: str | None = None) -> str:
    """Name of the extension (and of its build directory) for ``-march=arch`` on this CPU.

    ``arch``: the ``-march`` value (default ``$LORDBA_CPU_ARCH`` or ``native``); ``""`` for a build
    without ``-march``. The name carries a short key of the arch, the machine type and the CPU's
    instruction-set flags, the torch version, the source's sha256 and path, and the compiler's path and version
    (so that environments or installs sharing one cache keep one build each instead of rebuilding over each
    other: ninja's own records name absolute paths; and a compiler upgraded in place builds anew), and whether it
    is built without OpenMP (:func:`openmp`: a runtime installed later builds anew with it).
    """
    arch = _arch() if arch is None else arch
    source = "".join(hashlib.sha256(path.read_bytes()).hexdigest() for path in (*SOURCES, *HEADERS))
    where = str(SOURCE.resolve())  # ninja's records name absolute paths: one build per install
    parts = (arch, platform.machine(), cpu_flags(), torch.__version__, source, where, compiler_key())
    cxx = compiler()
    if cxx is not None and not openmp(cxx):
        parts += ("no-openmp",)
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    return f"lordba_cpu_{key}"


def build_directory(arch: str | None = None) -> Path:
    """The build directory of :func:`extension_name` ``(arch)`` under :func:`cache_root`."""
    return cache_root() / extension_name(arch)


def library_path(arch: str | None = None) -> Path | None:
    """Path the compiled library has (or would have) on this machine; ``None`` without a compiler.

    Once a library is loaded in this process, that one (whatever the environment says now)."""
    if _loaded is not None and arch is None:
        return _loaded
    if compiler() is None:
        return None
    directory = build_directory(arch)
    return directory / f"{directory.name}.so"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (created if needed) for the block.

    Under it no other process builds there, so a cpp_extension baton found now was left by a build
    that was killed: it is removed (else cpp_extension would wait for it forever). Raises ``OSError`` where the
    file system refuses the lock (NFS): a baton there may be another machine's running build (where there are no
    locks at all, Windows, the block runs unlocked as before)."""
    with locked(directory) as held:
        if not held and os.name == "posix":
            why = "its file system refuses locks (NFS?): set LORDBA_KERNEL_CACHE to a local folder"
            raise OSError(errno.ENOLCK, f"{directory}: {why}")
        (directory / "lock").unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def _build_env(cxx: str) -> Iterator[None]:
    """For the block: ``$CXX`` = ``cxx``, the ``ninja`` of the ``ninja`` package on ``PATH`` if none is
    (an environment that is not activated), and cpp_extension's compiler-ABI log warnings muted."""
    saved = {k: os.environ.get(k) for k in ("CXX", "PATH")}
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    os.environ["CXX"] = cxx
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError, AttributeError):
            import ninja

            os.environ["PATH"] = os.pathsep.join(filter(None, (str(ninja.BIN_DIR), saved["PATH"])))
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _failed(err: BaseException, cxx: str, path: Path) -> BuildResult:
    """The failed :class:`BuildResult` for what cpp_extension raised: the compiler's output (its end)."""
    if isinstance(err, ImportError):  # cpp_extension imports setuptools, which a uv venv (Python 3.12's venv) lacks
        hint = ": pip install setuptools" if err.name == "setuptools" else ""
        return BuildResult(False, path, f"torch.utils.cpp_extension cannot be imported ({err}){hint}")
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and path.is_file():
        return BuildResult(False, path, f"loading {path} failed: {err}")  # built, but dlopen refused it
    text = str(err)
    output = getattr(err, "output", None)
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    if output:
        text += "\n" + output
    text = text.strip()[-3000:] or type(err).__name__
    *rest, last = [p.name for p in SOURCES]
    names = f"{', '.join(rest)} and {last}" if rest else last
    return BuildResult(False, path, f"compiling {names} with {cxx} failed:\n{text}")


def _build_and_load(cxx: str, arch: str) -> tuple[Path, bool]:
    """Build (if needed) and load the library for ``-march=arch`` (``""``: no ``-march``).

    Returns its path and whether it was compiled now. Raises what :func:`jit_load` raises."""
    directory = build_directory(arch)
    library = directory / f"{directory.name}.so"
    cflags, ldflags = build_flags(cxx)
    cflags = [*cflags, f"-march={arch}"] if arch else list(cflags)
    before = _stamp(library)
    loaded = jit_load(directory, SOURCES, cflags, cxx, ldflags=ldflags)
    library = Path(loaded) if isinstance(loaded, str) else library
    return library, before is None or _stamp(library) != before


def jit_load(
    directory: Path,
    sources: Sequence[Path],
    cflags: Sequence[str],
    cxx: str,
    *,
    ldflags: Sequence[str] = (),
    python_module: bool = False,
) -> Any:
    """``cpp_extension.load`` of ``sources`` built in ``directory`` (the extension's name is the directory's)
    with ``cxx``, under the directory's lock (:func:`_locked`) and :func:`_build_env`: the library's path, or
    the Python module where ``python_module``.

    Raises what cpp_extension raises (``RuntimeError`` with the compiler's output,
    ``subprocess.CalledProcessError``, ``OSError``)."""
    from torch.utils import cpp_extension

    name = directory.name
    with _locked(directory), _build_env(cxx):
        # ninja is the cache; cpp_extension's in-process versioner would skip a build that failed
        # before in this process, or rename the library (name_v1) when the cache directory changed
        with contextlib.suppress(AttributeError):
            cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(name, None)
        return cpp_extension.load(
            name=name,
            sources=[str(path) for path in sources],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            build_directory=str(directory),
            verbose=False,
            with_cuda=False,
            is_python_module=python_module,
        )


def clean(directory: Path | None = None) -> Path | None:
    """Remove the build outputs in ``directory`` (default: the kernels' library for the current arch on this
    machine), so that the next build compiles again (``lordba build-kernels --force``); returns the
    directory (``None`` if there was none). A library already loaded by a process stays valid there. Raises
    ``OSError`` if the directory cannot be written."""
    directory = build_directory() if directory is None else directory
    if not directory.is_dir():
        return None
    with _locked(directory):
        for path in directory.iterdir():
            if path.suffix in (".so", ".o", ".d") or path.name in (".ninja_log", ".ninja_deps"):
                path.unlink(missing_ok=True)
    return directory


def env_switch(name: str) -> bool:
    """Whether the switch ``name`` (``LORDBA_NO_EXT``, ``LORDBA_NO_BOUND``) is on: set to anything but empty, ``0``,
    ``false``, ``no`` or ``off`` (``LORDBA_NO_EXT=0`` turned the kernels off)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def load(build: bool = True) -> BuildResult:
    """Load the compiled kernels into torch, compiling them first if needed (and ``build``).

    ``build``: compile if there is no library yet (else report ``"not built yet"``; an existing
    library is then loaded as it is, without checking it against the source). Returns a
    :class:`BuildResult`; never raises for a missing compiler, a failing build or load, or a cpp_extension that
    cannot be imported (``ok`` is ``False`` and ``message`` has the compiler's output).
    """
    global _loaded
    if env_switch("LORDBA_NO_EXT"):
        return BuildResult(False, None, "disabled by LORDBA_NO_EXT")
    if hasattr(torch.ops.lordba, "branch") and hasattr(torch.ops.lordba, "q4_linear"):
        return BuildResult(True, library_path(), "already loaded")
    cxx = compiler()
    if cxx is None:
        if os.environ.get("CXX"):  # set, but not to an executable: "ccache g++", a typo, a missing path
            why = f"$CXX={os.environ['CXX']!r} names no executable: set it to the compiler alone, e.g. CXX=clang++"
            return BuildResult(False, None, f"no C++ compiler found ({why})")
        return BuildResult(False, None, "no C++ compiler found (set $CXX, or install g++)")
    arch = _arch()
    path = library_path(arch)
    if not build:
        if not path.is_file():
            return BuildResult(False, path, "not built yet")
        try:
            torch.ops.load_library(str(path))
        except OSError as err:
            return BuildResult(False, path, f"loading {path} failed: {err}")
        _loaded = _made_global(path)
        _single_threaded(cxx)
        return BuildResult(True, path, "loaded from cache")
    try:
        path, built = _build_and_load(cxx, arch)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
        failed = _failed(err, cxx, path)
        if not (arch and refuses_march(failed.message)):
            return failed
        if arch != "native":  # asked for by name ($LORDBA_CPU_ARCH): another build would not be what was asked
            return BuildResult(
                False, path, f"LORDBA_CPU_ARCH={arch!r}: the compiler refuses -march={arch}\n{failed.message}"
            )
        try:  # the compiler does not take this -march: build without it
            path, built = _build_and_load(cxx, "")
        except (RuntimeError, OSError, subprocess.SubprocessError) as again:
            return _failed(again, cxx, library_path(""))
    _loaded = _made_global(path)
    _single_threaded(cxx)
    return BuildResult(True, path, "built" if built else "loaded from cache", built)


def _single_threaded(cxx: str) -> None:
    """Warn (logged) that the loaded kernels run on one thread, where ``cxx`` cannot build with OpenMP
    (:func:`openmp`) and torch's parallel loops are OpenMP's (with torch's own thread pool they need no flag)."""
    if openmp(cxx) or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return
    logging.getLogger(__name__).warning(
        "lordba: %s cannot build with OpenMP (-fopenmp), so the CPU kernels are built without it and run on one "
        "thread (the same results, slower on several cores). For several threads, install the compiler's OpenMP "
        "(clang on Debian/Ubuntu: apt install libomp-dev; Apple clang has none: docs/kernels.md) or set CXX=g++; "
        "the next process builds them with it.",
        cxx,
    )


def _made_global(path: Path) -> Path:
    """``path``, its symbols made global for AOTInductor's packages (:mod:`.aoti`); logged if that fails
    (compiled decode steps then call the ops through the proxy executor)."""
    from lordba.kernels.cpu.aoti import make_global

    try:
        make_global(path)
    except OSError as err:
        logging.getLogger(__name__).warning("the kernels' symbols stay local (%s): AOTInductor boxes their calls", err)
    return path
