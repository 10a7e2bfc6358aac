"""The package cache's compile lock (lordba.nn.aot_package), without compiling: inductor's compile is replaced by
one that writes a small zip."""

import errno
import os
import types
import zipfile

import pytest
import torch

from lordba.nn import aot_package

from conftest import locked_elsewhere, refuse_directory_locks


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOLCK])
def test_a_compile_is_locked_where_the_inductor_cache_refuses_directory_locks(tmp_path, monkeypatch, code):
    """Inductor writes a graph's files in its cache non-atomically and packages them outside its own lock; lordba's
    lock on that cache keeps two processes compiling one graph from packaging each other's half-written files. Where
    the cache refuses a directory's lock (NFS: TORCHINDUCTOR_CACHE_DIR on a shared home) the compile ran unlocked;
    it holds the lock of a file in the cache instead, which NFS's lock manager keeps."""
    from torch._inductor.runtime import cache_dir_utils

    cache, held = tmp_path / "inductor", []
    cache.mkdir()
    monkeypatch.setattr(cache_dir_utils, "cache_dir", lambda: str(cache))
    refuse_directory_locks(monkeypatch, code)

    def compile_and_package(program, package_path, inductor_configs):
        held.append(locked_elsewhere(cache / ".lordba-compile.lock", os.O_RDWR | os.O_CREAT))
        with zipfile.ZipFile(package_path, "w") as archive:
            archive.writestr("model/data.json", "{}")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    program = types.SimpleNamespace(graph_module=types.SimpleNamespace(code="def forward(self): pass"))
    path, seconds = aot_package.compiled_package(program, {}, tmp_path / "aot", lambda line: None)
    assert held == [True] and path.is_file() and seconds > 0
    assert aot_package.compiled_package(program, {}, tmp_path / "aot", lambda line: None) == (path, 0.0)
    assert held == [True]  # (the package is used as it is: no second compile)
