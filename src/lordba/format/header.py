"""The safetensors header of an adapter file (SPEC §6): what it describes and how it is checked.

Per module, five tensors of known dtype and shape (:func:`stored_shapes`, the one definition of the
stored sizes) and ``__metadata__`` naming the format, its version, the scale dtype and every module's
dims (:func:`lordba_metadata`). Reading checks the header against the config and the file length
before any tensor data is allocated (:func:`read_header`, :func:`check_header`), then each tensor's
values (:func:`read_tensor`, :func:`check_values`).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lordba._util.jsonio import parse_json, safe_repr
from lordba.config import FORMAT_VERSION, LoRDBAConfig
from lordba.core.packing import check_padding, packed_size
from lordba.core.scales import get_codec
from lordba.errors import AdapterFormatError
from lordba.format.tensorfile import ST_DTYPE_NAMES, ST_DTYPES, nbytes

FORMAT_NAME = "lordba"
MAX_HEADER_BYTES = 64 << 20
TENSOR_KINDS = ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out")
# A module path: dot-separated names of letters, digits, "_" and "-" (what PyTorch models use).
_MODULE_PATH_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_MODULE_PATH = 256
_INTERNAL = ("base_layer", "lordba_adapters")  # names inside a LoRDBA layer, never a target


def stored_shapes(
    in_features: int, out_features: int, r: int, scale_dtype: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of the five tensors stored for one module (SPEC §6), in :data:`TENSOR_KINDS` order.

    Takes the module's dims, its rank and the adapter's ``scale_dtype``; returns
    ``{"sign_A": (uint8, (packed r·in,)), "sign_B": (uint8, (packed out·r,)), "scale_in": (.., (in,)),
    "scale_mid": (.., (r,)), "scale_out": (.., (out,))}``. Raises :class:`ConfigError` for an
    unknown ``scale_dtype``. The one definition of the stored sizes (:mod:`lordba.format.sizes` sums them).
    """
    dt_in, dt_mid, dt_out = get_codec(scale_dtype).stored_dtypes
    return {
        "sign_A": (torch.uint8, (packed_size(r * in_features),)),
        "sign_B": (torch.uint8, (packed_size(out_features * r),)),
        "scale_in": (dt_in, (in_features,)),
        "scale_mid": (dt_mid, (r,)),
        "scale_out": (dt_out, (out_features,)),
    }


@dataclass
class ModuleRecord:
    """One adapted module as stored: dims and (once loaded) its five tensors."""

    path: str
    in_features: int
    out_features: int
    r: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def expected(self, scale_dtype: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Expected dtype and shape of each stored tensor of this module (:func:`stored_shapes`)."""
        return stored_shapes(self.in_features, self.out_features, self.r, scale_dtype)


def lordba_metadata(scale_dtype: str, modules: dict[str, ModuleRecord]) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an adapter file with ``modules`` (``{path: record}``)
    stored in ``scale_dtype``: format name and version, scale dtype and the JSON of every module's
    ``[in, out, r]``."""
    dims = {n: [r.in_features, r.out_features, r.r] for n, r in sorted(modules.items())}
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "scale_dtype": scale_dtype,
        "modules": json.dumps(dims, separators=(",", ":"), sort_keys=True),
    }


def read_header(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    """Read the header of the open safetensors file ``f`` (``size`` bytes; ``path`` names it in
    messages). Returns ``(tensor entries, __metadata__, header length)``; raises
    :class:`AdapterFormatError` for a truncated file, an oversized or non-JSON header, or missing
    or malformed metadata."""
    if size < 8:
        raise AdapterFormatError(f"{path}: {size} bytes, too short for a safetensors file (truncated)")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFormatError(
            f"{path}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit"
        )
    raw = f.read(n)
    if len(raw) != n:
        raise AdapterFormatError(f"{path}: the file ended inside its header (truncated)")
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{path}: missing or malformed __metadata__ (format, version, modules)")
    return header, metadata, n


def read_tensor(
    f: BinaryIO, path: Path, name: str, spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
) -> torch.Tensor:
    """Tensor ``name`` read from ``f`` at its ``spans`` entry ``(dtype, shape, start, stop)`` (absolute
    file offsets); raises :class:`AdapterFormatError` if the file ends inside it."""
    dtype, shape, start, stop = spans[name]
    buf = bytearray(stop - start)
    f.seek(start)
    if f.readinto(buf) != len(buf):
        raise AdapterFormatError(f"{path}: tensor {name}: the file ended inside its data (truncated)")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def check_header(
    header: dict[str, Any], metadata: dict[str, str], config: LoRDBAConfig, path: Path, data_bytes: int
) -> tuple[dict[str, ModuleRecord], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """Check a header (from :func:`read_header`) against ``config`` and the ``data_bytes`` that follow
    it. Returns the modules and, per tensor name, ``(dtype, shape, start, stop)`` relative to the
    data section; raises :class:`AdapterFormatError` on any disagreement (format, version, scale
    dtype, module names, ranks and targets, tensor names, dtypes, shapes and byte ranges)."""
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFormatError(f"{path}: metadata format is {safe_repr(metadata.get('format'))}, not {FORMAT_NAME!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise AdapterFormatError(
            f"{path}: metadata format_version {safe_repr(metadata.get('format_version'))} is not supported "
            f"(this lordba reads {FORMAT_VERSION})"
        )
    if metadata.get("scale_dtype") != config.scale_dtype:
        raise AdapterFormatError(
            f"{path}: metadata scale_dtype {safe_repr(metadata.get('scale_dtype'))} differs from the config's "
            f"{config.scale_dtype!r}"
        )
    dims = parse_json(metadata.get("modules", "").encode("utf-8", "surrogatepass"), f"{path}: metadata 'modules'")
    if not isinstance(dims, dict) or not dims:
        raise AdapterFormatError(f"{path}: metadata 'modules' must be a non-empty object of [in, out, r]")
    modules: dict[str, ModuleRecord] = {}
    for name, value in dims.items():
        _check_module_path(name, path)
        ok = isinstance(value, list) and len(value) == 3 and all(type(v) is int and 0 < v < 1 << 31 for v in value)
        if not ok:
            raise AdapterFormatError(
                f"{path}: module {name!r}: dims must be [in, out, r] positive ints, got {safe_repr(value)}"
            )
        in_f, out_f, r = value
        if r != config.rank_for(name):
            raise AdapterFormatError(
                f"{path}: module {name!r} has rank {r} but the config gives it rank {config.rank_for(name)}"
            )
        if not config.targets_module(name):
            raise AdapterFormatError(
                f"{path}: module {name!r} is not matched by target_modules={safe_repr(config.target_modules)}"
            )
        modules[name] = ModuleRecord(name, in_f, out_f, r)
    expected_names = {f"{n}.{k}" for n in modules for k in TENSOR_KINDS}
    missing = sorted(expected_names - set(header))
    extra = sorted(set(header) - expected_names)
    if missing:
        raise AdapterFormatError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise AdapterFormatError(
            f"{path}: unexpected tensor(s) {safe_repr(extra[:5])}{' ...' if len(extra) > 5 else ''}"
        )
    spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for rec in modules.values():
        for kind, (dtype, shape) in rec.expected(config.scale_dtype).items():
            name = f"{rec.path}.{kind}"
            entry = header[name]
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise AdapterFormatError(f"{path}: tensor {name}: malformed header entry")
            st_dtype = ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
            if st_dtype != dtype:
                raise AdapterFormatError(
                    f"{path}: tensor {name}: dtype {safe_repr(entry['dtype'])}, expected {ST_DTYPE_NAMES[dtype]}"
                )
            got = entry["shape"]
            if not (isinstance(got, list) and all(type(d) is int for d in got) and got == list(shape)):
                raise AdapterFormatError(f"{path}: tensor {name}: shape {safe_repr(got)}, expected {list(shape)}")
            offsets = entry["data_offsets"]
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                raise AdapterFormatError(f"{path}: tensor {name}: malformed data_offsets {safe_repr(offsets)}")
            size = nbytes(dtype, shape)
            if offsets[1] - offsets[0] != size or offsets[0] < 0:
                raise AdapterFormatError(
                    f"{path}: tensor {name}: byte range {safe_repr(offsets)} holds "
                    f"{safe_repr(offsets[1] - offsets[0])} bytes, expected {size}"
                )
            spans[name] = (dtype, shape, offsets[0], offsets[1])
    end = 0
    for name, (_, _, start, stop) in sorted(spans.items(), key=lambda item: item[1][2:]):
        if start != end:
            raise AdapterFormatError(
                f"{path}: tensor {name}: data does not follow the previous tensor (gap or overlap)"
            )
        end = stop
    if end != data_bytes:
        raise AdapterFormatError(
            f"{path}: the file holds {data_bytes} data bytes but its header describes {end} (truncated or padded)"
        )
    return modules, spans


def _check_module_path(name: str, path: Path) -> None:
    if len(name) > MAX_MODULE_PATH or not _MODULE_PATH_RE.fullmatch(name):
        raise AdapterFormatError(
            f"{path}: module name {safe_repr(name)} is not a module path (dot-separated names of letters, "
            f"digits, '_' and '-', at most {MAX_MODULE_PATH} characters)"
        )
    if any(part in _INTERNAL for part in name.split(".")):
        raise AdapterFormatError(f"{path}: module name {name!r} points inside a LoRDBA layer")


def check_values(rec: ModuleRecord, scale_dtype: str, path: Path) -> None:
    """Check a loaded module's tensor values: zero padding bits of the signs, finite float scales,
    int8 codes in [-127, 127] reaching ±127 unless all zero. Raises :class:`AdapterFormatError`."""
    for kind, numel in (("sign_A", rec.r * rec.in_features), ("sign_B", rec.out_features * rec.r)):
        check_padding(rec.tensors[kind], numel, f"{path}: tensor {rec.path}.{kind}")
    for kind in ("scale_in", "scale_mid", "scale_out"):
        t = rec.tensors[kind]
        name = f"{path}: tensor {rec.path}.{kind}"
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{name}: holds NaN or infinite values")
        elif scale_dtype == "int8":
            if bool((t == -128).any()):
                raise AdapterFormatError(f"{name}: int8 code -128 is outside the format's range [-127, 127]")
            peak = int(t.abs().max()) if t.numel() else 0
            if peak not in (0, 127):
                raise AdapterFormatError(f"{name}: a non-zero int8 scale vector must reach code ±127 (max is {peak})")
