"""Deterministic safetensors writing, and exact file sizes without writing.

``safetensors.torch.save`` keeps ``__metadata__`` in a hash map whose order changes from one
process to the next, so the same adapter would get different bytes (and checksums). The layout
itself is simple and documented (8-byte little-endian header length, JSON header, raw data), so it
is written here in one fixed order: metadata keys sorted, tensors ordered as safetensors orders
them (larger element size first, then name). ``safetensors`` still does all the reading.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable

import torch

from lordba.errors import LoRDBAError

# The safetensors dtype names of the dtypes lordba stores, both ways.
ST_DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
}
ST_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
# What to_bytes writes besides (training checkpoints hold a float64 model's trained tensors and its optimizer's).
_WRITTEN_NAMES: dict[torch.dtype, str] = {
    **ST_DTYPE_NAMES,
    torch.float64: "F64",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
# Every dtype name to_bytes writes, read back (a whole checkpoint's or cache entry's tensors).
ST_READ_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in _WRITTEN_NAMES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of the raw data of a tensor of ``dtype`` and ``shape`` (as stored in a safetensors file)."""
    return math.prod(shape) * _itemsize(dtype)


def _header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    ordered = sorted(entries, key=lambda e: (-_itemsize(e[1]), e[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, dtype, shape in ordered:
        n = nbytes(dtype, shape)
        if dtype not in _WRITTEN_NAMES:
            raise LoRDBAError(
                f"tensor {name!r}: cannot store dtype {dtype} (lordba writes {sorted(_WRITTEN_NAMES.values())})"
            )
        header[name] = {"dtype": _WRITTEN_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return raw, offset


def file_size(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> int:
    """Exact size in bytes of a safetensors file holding tensors of these names, dtypes and shapes."""
    raw, data = _header(entries, metadata or {})
    return 8 + len(raw) + data


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise ``tensors`` (CPU, contiguous) as safetensors bytes, deterministically."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    raw, _ = _header(entries, metadata or {})
    order = sorted(tensors, key=lambda n: (-_itemsize(tensors[n].dtype), n))
    parts = [struct.pack("<Q", len(raw)), raw]
    for name in order:
        t = tensors[name].detach().cpu().contiguous()
        parts.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)
