"""The package cache of :mod:`lordba.nn.aot`: one AOTInductor package per decode step, named by what its code
depends on, compiled once under a lock, checked before it is loaded.

A package's name is the sha256 of the exported graph's code, the tensors it reads (names, shapes, dtypes,
strides), the versions of torch, transformers and lordba, the kernels' library and the ops the package calls
directly: any change the graph sees compiles a new package and nothing stale is reused. A package is written
whole or not at all (:func:`~lordba.format.atomic.atomic_write_path`: a temporary name, fsynced, then a
rename), and a damaged one (a zip entry's CRC or its end) is compiled again, never run. The temporary file of a
compile that was killed (SIGKILL, out of memory) is removed by the next call once its process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lordba._util.locks import locked, locked_file
from lordba.format.atomic import TMP_MARK, atomic_write_path, remove_killed_temporaries

AOT_DIR = "aot"
COMPILE_LOCK = ".lordba-compile.lock"  # in inductor's cache, where its folder cannot be locked (NFS)

# Inductor's settings of every compile (the package's name hashes them). ``always_keep_tensor_constants``: inductor
# inlines a tensor of no or one dimension of at most 8 values into the code it generates (an adapter's ``scale_mid``
# at rank <= 8), which a package that binds the live model's tensors must not do: its name holds shapes, not values.
_CONFIGS: dict[str, Any] = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}


def package_dir() -> Path:
    """Where packages are kept by default: ``<lordba cache>/aot``."""
    from lordba._util.cachedir import cache_dir

    return Path(cache_dir()) / AOT_DIR


def package_key(program: Any, tensors: dict[str, torch.Tensor], shims: dict) -> str:
    """sha256 of what the compiled code depends on: the graph, the tensors' names/shapes/dtypes, versions, the
    compile's settings, the ops it calls directly (``shims``: :func:`lordba.kernels.cpu.aoti.c_shims`' answer) and
    torch's thread count (inductor writes it into the code's parallel loops: a package built at 16 threads
    oversubscribed 2 cores, one built at 1 ran single-threaded)."""
    import transformers

    from lordba._version import __version__
    from lordba.kernels.cpu import extension_name

    h = hashlib.sha256()
    direct = sorted(str(op) for op in shims)  # the ops the package calls directly (kernels.cpu.aoti)
    code = program.graph_module.code
    configs = sorted(_CONFIGS.items())
    threads = torch.get_num_threads()
    for part in (torch.__version__, transformers.__version__, __version__, extension_name(), direct, configs, code):
        h.update(str(part).encode() + b"\0")
    h.update(f"threads={threads}\0".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{tuple(t.stride())}\n".encode())
    return h.hexdigest()[:32]


def compiled_package(
    program: Any, tensors: dict[str, torch.Tensor], folder: Path, log: Callable[[str], None]
) -> tuple[Path, float]:
    """The package of ``program`` in ``folder`` (compiled now if absent or damaged: :func:`_intact`; written
    whole or not at all).

    A compile holds a lock on inductor's cache directory: inductor writes a graph's files there under names
    of its hash, shared by every process and not atomically (``open(..., "w")``), so two processes compiling
    one graph at once packaged each other's half-written files (an empty ``*_metadata.json`` that no loader
    reads). A package another process compiled while this one waited is then used as it is."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    from lordba.kernels.cpu.aoti import c_shims

    shims = c_shims()
    path = folder / f"step-{package_key(program, tensors, shims)}.pt2"
    _remove_killed(folder)
    if _usable(path, log):
        return path, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    with _compile_lock(Path(inductor_cache_dir())):
        if _usable(path, log):
            return path, 0.0
        log(f"compiling the decode step ahead of time (once per model, adapter and cache length): {path.name}")
        start = time.perf_counter()
        configs = dict(_CONFIGS)
        if shims:
            configs["aot_inductor.custom_ops_to_c_shims"] = shims
        with atomic_write_path(path, suffix=".pt2") as tmp:  # a hidden name, never a step-*.pt2 one
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        return path, time.perf_counter() - start


@contextlib.contextmanager
def _compile_lock(cache: Path) -> Iterator[None]:
    """Hold the lock on inductor's cache ``cache`` (:func:`~lordba._util.locks.locked`); where its file system
    refuses a directory's lock (NFS: a cache on a shared home), the lock of the file ``cache/COMPILE_LOCK`` instead
    (NFS's lock manager keeps a file's): unlocked, two processes compiling one graph at once could package each
    other's half-written files (whole as a zip: only a package that fails to load is compiled again)."""
    with locked(cache) as held:
        if held:
            yield
            return
    with locked_file(cache / COMPILE_LOCK):
        yield


def _remove_killed(folder: Path) -> None:
    """Remove the temporary packages in ``folder`` of compiles whose process is gone: a compile killed by a signal
    it cannot catch (SIGKILL, the out-of-memory killer) left its half-written ``.step-*.pt2`` file there for good
    (megabytes each, in the cache; :func:`~lordba.format.atomic.atomic_write_path` names it by its process id)."""
    remove_killed_temporaries(folder, f".step-*.pt2{TMP_MARK}*")


def _usable(path: Path, log: Callable[[str], None]) -> bool:
    """Whether the package at ``path`` is there and :func:`_intact` (a damaged one is removed)."""
    if not path.is_file():
        return False
    if _intact(path):
        return True
    log(f"the compiled decode step {path} is damaged (a zip entry's CRC or its end): compiling it again")
    path.unlink(missing_ok=True)
    return False


def _intact(path: Path) -> bool:
    """Whether every entry of the package at ``path`` reads back with its CRC (AOTInductor's loader checks
    none: a flipped byte of the compiled code would be run)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except Exception:  # not a zip, cut short, an entry that does not decompress: damaged
        return False
