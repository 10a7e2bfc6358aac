"""The kernels' C entry points for AOTInductor (``shim.h``): what :mod:`lordba.nn.aot` hands the compiler
as ``aot_inductor.custom_ops_to_c_shims``, so that a compiled decode step calls each op directly
instead of through AOTInductor's proxy executor (which boxes every argument and copies the op's schema
on every call: ~1-2 µs an op call, 211 of them a decoded token on SmolLM2; docs/kernels.md).

The compiled package leaves these symbols undefined; they resolve against the kernels' library once it
is loaded with its symbols global (:func:`make_global`, done by :func:`lordba.kernels.cpu.load`).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

_T, _OPT = "AtenTensorHandle", "AtenTensorHandle*"
_Q4 = (f"{_T} x", f"{_T} qweight", f"{_T} scale", f"{_T} minus", "int64_t in_features", "int64_t gemm_min_tokens",
       "int64_t bits", "int32_t bf16", "int32_t int8_dot")  # fmt: skip
_ADAPTER = (f"{_T} sign_A", f"{_T} sign_B", f"{_T} b", f"{_T} m", f"{_T} a", "double scaling",
            "int64_t sign_max_tokens")  # fmt: skip


def _list(name: str, c_type: str = _T) -> tuple[str, str]:
    """A list argument as AOTInductor passes it: a pointer to its elements and their number."""
    return f"const {c_type}* {name}", f"int64_t {name}_len"


_Q4_LISTS = (f"{_T} x", *_list("qweight"), *_list("scale"), *_list("minus"), *_Q4[4:])
_ADAPTER_LISTS = (*(h for n in ("sign_A", "sign_B", "b", "m", "a") for h in _list(n)), *_list("scaling", "double"),
                  "int64_t sign_max_tokens")  # fmt: skip
# op name -> its C arguments (the schema's, in order; then the result, AtenTensorHandle* ret0), as shim.h's
# definitions take them
SIGNATURES: dict[str, tuple[str, ...]] = {
    "q4_linear": _Q4,
    "q4_branch": (*_Q4, f"{_OPT} bias", *_ADAPTER, *(f"{_OPT} {n}" for n in ("folded_A", "folded_B", "tile_A"))),
    "q4_group": (*_Q4_LISTS, *_ADAPTER_LISTS),
    "decode_attention": (f"{_T} q", f"{_T} k", f"{_T} v", f"{_OPT} mask", "double scale"),
}
_global: set[str] = set()


def make_global(path: Path) -> None:
    """Make the loaded library at ``path`` resolve other libraries' undefined symbols (``RTLD_GLOBAL``;
    torch loads op libraries locally). Raises ``OSError`` if it is not loaded, cannot be reopened, or the
    platform has no such flags (Windows)."""
    flags = getattr(os, "RTLD_GLOBAL", None), getattr(os, "RTLD_NOLOAD", None)
    if None in flags:
        raise OSError("this platform cannot reopen a loaded library with RTLD_GLOBAL")
    ctypes.CDLL(str(path), mode=flags[0] | flags[1])
    _global.add(str(path))


def c_shims() -> dict:
    """``{OpOverload: [C declaration]}`` for ``aot_inductor.custom_ops_to_c_shims``: every op of
    :data:`SIGNATURES` when the kernels' library is loaded with its symbols global, else ``{}`` (the
    compiled step then calls the ops through the proxy executor, as before)."""
    if not _global:
        return {}
    ops = torch.ops.lordba  # the library that registers these ops is the one made global
    return {
        getattr(ops, name).default: [f"AOTITorchError aoti_torch_cpu_{name}({', '.join((*args, f'{_OPT} ret0'))})"]
        for name, args in SIGNATURES.items()
    }
