"""``lordba.kernels.cpu.aoti``: the C entry points AOTInductor calls instead of its proxy executor —
each declared one is exported by the loaded library, and its declaration matches the op's schema
argument for argument (a schema change without its shim fails here, not as a crash in a package)."""

import ctypes
import re

import pytest
import torch

from lordba.kernels import cpu, cpu_available
from lordba.kernels.cpu.aoti import SIGNATURES, c_shims

pytestmark = pytest.mark.skipif(not cpu_available(), reason="CPU kernels needed")

C_TYPE = {"Tensor": "AtenTensorHandle", "Optional[Tensor]": "AtenTensorHandle*", "int": "int64_t", "bool": "int32_t",
          "float": "double"}  # fmt: skip


def expected(schema):
    """The C arguments of a schema's arguments: one each, a list two (``const T* name``, ``int64_t name_len``)."""
    out = []
    for arg in schema:
        kind = str(arg.type)
        if kind.startswith("List["):
            out += [(f"const {C_TYPE[kind[5:-1]]}*", arg.name), ("int64_t", f"{arg.name}_len")]
        else:
            out.append((C_TYPE[kind], arg.name))
    return out


def test_every_declared_shim_is_exported_and_matches_its_ops_schema():
    shims = c_shims()
    assert {op.name() for op in shims} == {f"lordba::{name}" for name in SIGNATURES}
    library = ctypes.CDLL(str(cpu.library_path()))
    for op, (declaration,) in shims.items():
        name = op.name().split("::")[1]
        assert declaration.startswith(f"AOTITorchError aoti_torch_cpu_{name}(")
        assert getattr(library, f"aoti_torch_cpu_{name}")  # exported (ctypes raises AttributeError if not)
        args = re.search(r"\((.*)\)", declaration).group(1).split(", ")
        assert args[-1] == "AtenTensorHandle* ret0"
        assert [tuple(a.rsplit(" ", 1)) for a in args[:-1]] == expected(op._schema.arguments), op
        assert [str(r.type) for r in op._schema.returns] == ["Tensor"]


def test_the_library_resolves_symbols_globally():
    """The package leaves the shims undefined: they must resolve from the process's global scope."""
    assert hasattr(ctypes.CDLL(None), "aoti_torch_cpu_q4_branch")  # dlsym(RTLD_DEFAULT): global symbols only
    assert torch.ops.lordba.q4_branch.default in c_shims()


def test_without_global_symbols_packages_box_the_calls(monkeypatch, tmp_path):
    """Where the library cannot be reopened globally (no such flags, or not loaded), make_global says so
    with an OSError, which load() logs, and c_shims() is empty: compiled steps use the proxy executor."""
    from lordba.kernels.cpu import aoti

    monkeypatch.delattr(aoti.os, "RTLD_NOLOAD")
    with pytest.raises(OSError, match="RTLD_GLOBAL"):
        aoti.make_global(cpu.library_path())
    monkeypatch.undo()
    with pytest.raises(OSError):
        aoti.make_global(tmp_path / "not-loaded.so")
    monkeypatch.setattr(aoti, "_global", set())
    assert aoti.c_shims() == {}
