"""The safetensors header of an adapter file (SPEC §6): what it describes and how it is checked.

Per module, five tensors of known dtype and shape (:func:`stored_shapes`, the one definition of the
stored sizes) and ``__metadata__`` naming the format, its version, the scale dtype and every module's
dims (:func:`lordba_metadata`). Reading checks the header against the config and the file length
before any tensor data is allocated (:func:`read_header`, :func:`check_header`), then each tensor's
values (:func:`read_tensors`, :func:`lordba.format.values.check_all_values`). This is the layout of
format versions 1 and 2, one entry per module and kind; version 3 (one entry per kind) shares the
metadata and module checks (:func:`check_metadata`, :func:`check_modules`) in
:mod:`lordba.format.compact`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lordba._util.jsonio import parse_json, safe_repr
from lordba._util.patterns import matches
from lordba.config import COMPACT_FORMAT_VERSION, FORMAT_VERSION, READABLE_VERSIONS, LoRDBAConfig
from lordba.core.packing import packed_size
from lordba.core.scales import NIBBLE_DTYPES, get_codec
from lordba.errors import AdapterFormatError
from lordba.format.extras import extra_entries
from lordba.format.tensorfile import ST_DTYPE_NAMES
from lordba.format.values import check_all_values, check_values  # noqa: F401  (re-exported)

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


def lordba_metadata(
    scale_dtype: str, modules: dict[str, ModuleRecord], config_sha256: str | None = None
) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an adapter file with ``modules`` (``{path: record}``)
    stored in ``scale_dtype``: format name and version, scale dtype, the JSON of every module's
    ``[in, out, r]`` and, if given, the digest of the config (``config_sha256``, see
    :mod:`lordba.format.integrity`)."""
    dims = {n: [r.in_features, r.out_features, r.r] for n, r in sorted(modules.items())}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "scale_dtype": scale_dtype,
        "modules": json.dumps(dims, separators=(",", ":"), sort_keys=True),
    }
    if config_sha256 is not None:
        metadata["config_sha256"] = config_sha256
    return metadata


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


ALIGN = 64  # bytes: a cache line, and what the kernels' vector loads want (torch allocates so)


def read_file_bytes(f: BinaryIO, path: Path, size: int, aligned_at: int = 0) -> torch.Tensor:
    """The first ``size`` bytes of the open file ``f`` as one ``uint8`` tensor (one read into it, no
    intermediate copy), placed so that byte ``aligned_at`` of the file (a safetensors file's first
    tensor byte) lies on a :data:`ALIGN`-byte boundary in memory, as it would in a tensor of its own.
    Raises :class:`AdapterFormatError` if the bytes cannot be allocated or the file ends early (it
    shrank since its size was taken)."""
    try:
        raw = torch.empty(size + ALIGN, dtype=torch.uint8)
    except RuntimeError:
        raise AdapterFormatError(f"{path}: cannot allocate the {size} bytes of the file") from None
    start = -(raw.data_ptr() + aligned_at) % ALIGN
    data = raw[start : start + size]
    f.seek(0)
    view, done = memoryview(data.numpy()), 0
    while done < size:
        got = f.readinto(view[done:])
        if not got:
            raise AdapterFormatError(f"{path}: the file ended at byte {done} of {size} (truncated while read)")
        done += got
    return data


def tensor_views(
    data: torch.Tensor, spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
) -> dict[str, torch.Tensor]:
    """Every tensor of ``spans`` (``{name: (dtype, shape, start, stop)}``, byte offsets into ``data``
    that the header checks keep inside it) as a view of the ``uint8`` tensor ``data`` (a copy where a
    view would be misaligned for its dtype in memory; lordba's writer pads its header to 8 bytes and
    orders tensors by element size, and :func:`read_file_bytes` aligns the data, so none is)."""
    offset = data.storage_offset()
    wholes: dict[torch.dtype, tuple[torch.Tensor, int]] = {}  # data seen as each dtype, from byte `skip`
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, start, stop) in spans.items():
        size = _itemsize(dtype)
        if (offset + start) % size:
            t = data[start:stop].clone().view(dtype)
        else:
            if dtype not in wholes:
                skip = -offset % size
                usable = len(data) - skip
                wholes[dtype] = (data[skip : skip + usable - usable % size].view(dtype), skip)
            whole, skip = wholes[dtype]
            t = whole[(start - skip) // size : (stop - skip) // size]
        out[name] = t if len(shape) == 1 else t.view(shape)
    return out


def check_metadata(metadata: dict[str, str], config: LoRDBAConfig, path: Path) -> str:
    """Check the metadata's format, version (readable, and the config's) and scale dtype (the
    config's; ``int4`` only in version 3 files). Returns the version string; raises
    :class:`AdapterFormatError` naming ``path``."""
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFormatError(f"{path}: metadata format is {safe_repr(metadata.get('format'))}, not {FORMAT_NAME!r}")
    version = metadata.get("format_version")
    if version not in [str(v) for v in READABLE_VERSIONS]:
        raise AdapterFormatError(
            f"{path}: metadata format_version {safe_repr(version)} is not supported "
            f"(this lordba reads {list(READABLE_VERSIONS)})"
        )
    if version != str(getattr(config, "file_version", version)):
        raise AdapterFormatError(
            f"{path}: metadata format_version {safe_repr(version)} differs from the "
            f"config's format_version {config.file_version}"
        )
    if metadata.get("scale_dtype") != config.scale_dtype:
        raise AdapterFormatError(
            f"{path}: metadata scale_dtype {safe_repr(metadata.get('scale_dtype'))} differs from the config's "
            f"{config.scale_dtype!r}"
        )
    if config.scale_dtype in NIBBLE_DTYPES and version != str(COMPACT_FORMAT_VERSION):
        raise AdapterFormatError(
            f"{path}: scale_dtype {config.scale_dtype!r} is stored only in format version "
            f"{COMPACT_FORMAT_VERSION} files"
        )
    return version


def check_modules(dims: Any, config: LoRDBAConfig, path: Path) -> dict[str, ModuleRecord]:
    """Check parsed ``{module path: [in, out, r]}`` against ``config`` (paths, dims, ranks, targets,
    exclusions). Returns the records; raises :class:`AdapterFormatError` naming ``path``."""
    if not isinstance(dims, dict) or not dims:
        raise AdapterFormatError(f"{path}: metadata 'modules' must be a non-empty object of [in, out, r]")
    modules: dict[str, ModuleRecord] = {}
    for name, value in dims.items():
        check_module_path(name, path)
        if not (isinstance(value, list) and len(value) == 3 and _dims_ok(*value)):
            raise AdapterFormatError(
                f"{path}: module {name!r}: dims must be [in, out, r] positive ints, got {safe_repr(value)}"
            )
        in_f, out_f, r = value
        if r != config.rank_for(name):
            raise AdapterFormatError(
                f"{path}: module {name!r} has rank {r} but the config gives it rank {config.rank_for(name)}"
            )
        if not config.targets_module(name, legacy=True):  # a file written before PEFT 0.21's rule
            raise AdapterFormatError(
                f"{path}: module {name!r} is not matched by target_modules={safe_repr(config.target_modules)}"
            )
        if matches(config.exclude_modules, name):
            raise AdapterFormatError(
                f"{path}: module {name!r} is excluded by exclude_modules={safe_repr(config.exclude_modules)}"
            )
        modules[name] = ModuleRecord(name, in_f, out_f, r)
    return modules


def check_header(
    header: dict[str, Any], metadata: dict[str, str], config: LoRDBAConfig, path: Path, data_bytes: int
) -> tuple[dict[str, ModuleRecord], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """Check a version 1 or 2 header (from :func:`read_header`) against ``config`` and the
    ``data_bytes`` that follow it. Returns the modules and, per tensor name, ``(dtype, shape, start,
    stop)`` relative to the data section; raises :class:`AdapterFormatError` on any disagreement
    (format, version, scale dtype, module names, ranks and targets, tensor names, dtypes, shapes and
    byte ranges). Version 3 files: :func:`lordba.format.compact.check_compact_header`."""
    check_metadata(metadata, config, path)
    dims = parse_json(metadata.get("modules", "").encode("utf-8", "surrogatepass"), f"{path}: metadata 'modules'")
    modules = check_modules(dims, config, path)
    extras = extra_entries(header, metadata, path)  # format version 2: extra tensors, checked there
    expected = [(f"{rec.path}.{k}", *v) for rec in modules.values() for k, *v in _expected(rec, config.scale_dtype)]
    spans = check_tensor_set(header, expected, extras, path)
    check_contiguous(spans, data_bytes, path)
    return modules, spans


def check_tensor_set(
    header: dict[str, Any],
    expected: list[tuple[str, torch.dtype, tuple, int]],
    extras: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    path: Path,
) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """The header holds exactly the ``expected`` ``(name, dtype, shape, byte size)`` tensors and the
    ``extras``, each entry as expected (:func:`_check_entries`). Returns their spans; raises
    :class:`AdapterFormatError` naming the first missing, unexpected or malformed tensor."""
    expected_names = {e[0] for e in expected} | set(extras)
    present = set(header)
    missing = sorted(expected_names - present)
    extra = sorted(present - expected_names)
    if missing:
        raise AdapterFormatError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise AdapterFormatError(
            f"{path}: unexpected tensor(s) {safe_repr(extra[:5])}{' ...' if len(extra) > 5 else ''}"
        )
    extra_specs = [(k, d, shape, math.prod(shape) * _itemsize(d)) for k, (d, shape) in extras.items()]
    return _check_entries(header, expected + extra_specs, path)


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_ITEMSIZE = {torch.uint8: 1, torch.int8: 1, torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


def _itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE.get(dtype) or torch.empty(0, dtype=dtype).element_size()


@functools.lru_cache(maxsize=256)
def _expected_for(dims: tuple[int, int, int], scale_dtype: str) -> tuple[tuple, ...]:
    """``(kind, dtype, shape, byte size)`` of the five stored tensors of a module of these dims
    (kept: an adapter's modules share a few shapes)."""
    shapes = stored_shapes(*dims, scale_dtype).items()
    return tuple((k, d, shape, math.prod(shape) * _itemsize(d)) for k, (d, shape) in shapes)


def stored_specs(in_features: int, out_features: int, r: int, scale_dtype: str) -> tuple[tuple, ...]:
    """:func:`stored_shapes` as ``(kind, dtype, shape, byte size)`` tuples in :data:`TENSOR_KINDS`
    order, kept per dims (immutable: what hot paths such as building hundreds of adapters use)."""
    return _expected_for((in_features, out_features, r), scale_dtype)


def _expected(rec: ModuleRecord, scale_dtype: str) -> tuple[tuple, ...]:
    return _expected_for((rec.in_features, rec.out_features, rec.r), scale_dtype)


def _check_entries(
    header: dict[str, Any], expected: list[tuple[str, torch.dtype, tuple, int]], path: Path
) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """Each expected ``(name, dtype, shape, byte size)`` tensor's header entry: exactly its keys,
    dtype, shape (ints) and a byte range of that size. Returns ``{name: (dtype, shape, start, stop)}``
    (relative to the data section); raises :class:`AdapterFormatError` naming the tensor."""
    spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    names = {d: ST_DTYPE_NAMES[d] for d in {e[1] for e in expected}}
    shape_reprs: dict[tuple, str] = {}
    for name, dtype, shape, size in expected:
        entry = header[name]
        if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
            if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
                raise AdapterFormatError(f"{path}: tensor {name}: malformed header entry")
        if entry["dtype"] != names[dtype] or type(entry["dtype"]) is not str:
            raise AdapterFormatError(
                f"{path}: tensor {name}: dtype {safe_repr(entry['dtype'])}, expected {ST_DTYPE_NAMES[dtype]}"
            )
        got = entry["shape"]
        want = shape_reprs.get(shape) or shape_reprs.setdefault(shape, repr(list(shape)))
        if type(got) is not list or repr(got) != want:  # JSON lists: equal reprs = the same ints
            raise AdapterFormatError(f"{path}: tensor {name}: shape {safe_repr(got)}, expected {list(shape)}")
        offsets = entry["data_offsets"]
        if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
            raise AdapterFormatError(f"{path}: tensor {name}: malformed data_offsets {safe_repr(offsets)}")
        start, stop = offsets
        if stop - start != size or start < 0:
            raise AdapterFormatError(
                f"{path}: tensor {name}: byte range {safe_repr(offsets)} holds {safe_repr(stop - start)} bytes, "
                f"expected {size}"
            )
        spans[name] = (dtype, shape, start, stop)
    return spans


def check_contiguous(
    spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], data_bytes: int, path: Path
) -> None:
    """The byte ranges tile the data section exactly: no gap, no overlap, nothing after."""
    end = 0
    for start, stop, name in sorted([(s[2], s[3], n) for n, s in spans.items()]):
        if start != end:
            raise AdapterFormatError(
                f"{path}: tensor {name}: data does not follow the previous tensor (gap or overlap)"
            )
        end = stop
    if end != data_bytes:
        raise AdapterFormatError(
            f"{path}: the file holds {data_bytes} data bytes but its header describes {end} (truncated or padded)"
        )


def _dims_ok(in_f: object, out_f: object, r: object) -> bool:
    """Whether ``[in, out, r]`` are ints in ``(0, 2³¹)`` (not bools, not floats)."""
    return all(type(v) is int and 0 < v < 1 << 31 for v in (in_f, out_f, r))


def check_module_path(name: object, path: str | Path) -> None:
    """Refuse a module path an adapter file cannot hold: not dot-separated names of letters, digits,
    ``_`` and ``-``, longer than :data:`MAX_MODULE_PATH` characters, or inside a LoRDBA layer.
    ``path`` names the file (or the operation) in the message. Returns nothing; raises
    :class:`AdapterFormatError`. Readers, writers and the converter all apply this one rule."""
    if not isinstance(name, str) or len(name) > MAX_MODULE_PATH or not _MODULE_PATH_RE.fullmatch(name):
        raise AdapterFormatError(
            f"{path}: module name {safe_repr(name)} is not a module path (dot-separated names of letters, "
            f"digits, '_' and '-', at most {MAX_MODULE_PATH} characters)"
        )
    if any(part in _INTERNAL for part in name.split(".")):
        raise AdapterFormatError(f"{path}: module name {name!r} points inside a LoRDBA layer")
