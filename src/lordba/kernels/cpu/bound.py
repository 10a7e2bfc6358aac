"""Kept kernel calls with their arguments bound in C++ (``bound.cpp``): what eager decode's layers call.

A call through ``torch.ops`` parses each of its arguments from Python on every call (``q4_branch`` has 20):
in a hot loop ~5 µs for a layer whose kernel takes ~1 µs, and more in a model, whose weights streaming
through the caches evict the interpreter's state between layer calls. A bound call (``Q4Call``: a q4 layer's
own forward; ``LayerCall``: an adapted layer's kept call, :mod:`lordba.nn.fastpath`) takes the input alone,
checks in C++ that nothing it was bound to has changed (the module's tensors by identity, its compute flags,
the model call's token, the adapters' epoch, grad mode, hooks, the input's type, device and dtype) and calls
the op through the dispatcher's typed handle, so that dispatch modes, tracing and the profiler see the same op
call as ``torch.ops``' own. Where a check fails it returns ``None`` and the caller takes its ordinary path.
A copy of a module (``deepcopy``, pickle) gets ``None`` for a kept call and binds its own.

It is a small Python extension, built beside the kernels' library (:func:`lordba.kernels.cpu.load`, ~20 s
once per machine, by ``lordba build-kernels`` or the first call) into the same cache. Where it cannot be built
or loaded (no Python headers, ``LORDBA_NO_BOUND=1``) :func:`module` is ``None`` and the layers call the ops
through ``torch.ops`` as before: the same results, a little slower.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

from lordba.kernels import cpu

SOURCE = Path(__file__).with_name("bound.cpp")
_CFLAGS = ("-O2", "-std=c++20", "-w")
_module: list[ModuleType | None] = []  # [the module or None] once looked for in this process
_looking = threading.Lock()  # (held by the thread looking for it: another waits and takes what that one found)
_log = logging.getLogger(__name__)


def extension_name() -> str:
    """The extension's name (and its build directory's): a key of its source and path, the torch version,
    the Python ABI and the compiler's path and version."""
    where = str(SOURCE.resolve())
    abi = sysconfig.get_config_var("EXT_SUFFIX") or sys.version
    parts = (hashlib.sha256(SOURCE.read_bytes()).hexdigest(), where, torch.__version__, abi, cpu.compiler_key())
    return "lordba_bound_" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def module(build: bool = True) -> ModuleType | None:
    """The bound calls' module, built first if needed (and ``build``); ``None`` where the kernels' library
    is not loaded, ``LORDBA_NO_BOUND`` is set, or it cannot be built or loaded (logged once). Looked for once per
    process: threads asking at once wait for the first (each built it in turn, under the build directory's lock,
    and imported it again). Never raises."""
    if _module:
        return _module[0]
    with _looking:
        if not _module:
            _module.append(_look_for(build))
    return _module[0]


def _look_for(build: bool) -> ModuleType | None:
    """The module, built first if needed (and ``build``), or ``None`` (logged)."""
    if cpu.env_switch("LORDBA_NO_BOUND") or not cpu.load(build=build).ok:
        return None
    try:
        return _build_and_import(build)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:
        _log.warning("lordba's bound kernel calls are unavailable (ops are called through torch.ops): %s", err)
    return None


def build_directory() -> Path:
    """Where the extension is built (in the kernels' cache, :func:`lordba.kernels.cpu.cache_root`)."""
    return cpu.cache_root() / extension_name()


def clean() -> Path | None:
    """Remove the extension's build outputs (``lordba build-kernels --force``): see
    :func:`lordba.kernels.cpu.clean`. A module already imported by a process stays valid there."""
    return cpu.clean(build_directory())


def _build_and_import(build: bool) -> ModuleType | None:
    cxx = cpu.compiler()
    if cxx is None:
        return None
    directory = build_directory()
    if not build and not (directory / f"{directory.name}.so").is_file():
        return None
    return cpu.jit_load(directory, [SOURCE], _CFLAGS, cxx, python_module=True)
