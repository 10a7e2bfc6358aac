"""Format version 3, the compact file: one safetensors entry per tensor *kind*.

Version 1 stores five entries per module (``P.sign_A`` ...): for an all-linear adapter of a small
model that is a header of ~117 kB beside a payload of ~1 MB. Version 3 stores five entries in all,
``sign_A``, ``sign_B``, ``scale_in``, ``scale_mid`` and ``scale_out``, each the concatenation of
every module's tensor of that kind (the bytes version 1 stores for it) in the order of the sorted
module paths; the offsets follow from the modules' dims in the metadata. ``modules`` is written with
runs of layer indices folded (``model.layers.{0..29}.mlp.up_proj``: one key per run of equal
dims), in the one canonical form :func:`fold_names` writes. Extra tensors (``extra:...``) are
stored as in version 2, one entry each. The ``int4`` scale format, whose codes a file stores as
4-bit indices (:func:`lordba.core.scales.pack_nibbles`), exists only in version 3 files.

Reading checks every entry against the dims and the config before anything is allocated, then
hands out each module's tensors as views of the one buffer read (``int4`` codes: views of the one
decoded buffer).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from pathlib import Path
from typing import Any

import torch

from lordba._util.jsonio import parse_json, safe_repr
from lordba.config import COMPACT_FORMAT_VERSION
from lordba.core.scales import NIBBLE_DTYPES, pack_nibbles, unpack_nibbles
from lordba.errors import AdapterFormatError
from lordba.format.extras import extra_entries
from lordba.format.header import (
    FORMAT_NAME,
    TENSOR_KINDS,
    ModuleRecord,
    check_contiguous,
    check_metadata,
    check_modules,
    check_tensor_set,
    stored_shapes,
)

_RANGE = re.compile(r"\{(0|[1-9][0-9]{0,9})\.\.(0|[1-9][0-9]{0,9})\}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")
Span = tuple[torch.dtype, tuple[int, ...], int, int]


def file_shapes(
    in_features: int, out_features: int, r: int, scale_dtype: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of each of a module's five tensors as a file stores them: those of
    :func:`~lordba.format.header.stored_shapes`, but for a nibble format (``int4``) the ``b`` and
    ``a`` codes as uint8 ``[ceil(n / 2)]`` (two 4-bit indices per byte). Raises :class:`ConfigError`
    for an unknown ``scale_dtype``."""
    shapes = stored_shapes(in_features, out_features, r, scale_dtype)
    if scale_dtype in NIBBLE_DTYPES:
        shapes["scale_in"] = (torch.uint8, ((in_features + 1) // 2,))
        shapes["scale_out"] = (torch.uint8, ((out_features + 1) // 2,))
    return shapes


@functools.lru_cache(maxsize=256)
def _sizes(dims: tuple[int, int, int], scale_dtype: str) -> tuple[tuple[torch.dtype, int, int], ...]:
    """Per kind (:data:`TENSOR_KINDS` order): the file dtype, the file element count and the
    in-memory element count of a module of these dims (kept: an adapter's modules share a few)."""
    memory = stored_shapes(*dims, scale_dtype)
    return tuple((d, shape[0], memory[k][1][0]) for k, (d, shape) in file_shapes(*dims, scale_dtype).items())


def fold_names(dims: dict[str, list[int]]) -> dict[str, list[int]]:
    """``{module path: [in, out, r]}`` with runs of consecutive indices (the first all-digit part of a
    path, e.g. the layer number) of equal dims folded into ``{a..b}``; keys sorted. The canonical form
    version 3 stores (:func:`unfold_names` inverts it)."""
    runs: dict[tuple[str, str, tuple[int, ...]], list[int]] = {}
    out: dict[str, list[int]] = {}
    for name, value in dims.items():
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if _INDEX.fullmatch(p)), None)
        if at is None:
            out[name] = list(value)
            continue
        key = (".".join(parts[:at]), ".".join(parts[at + 1 :]), repr(list(value)))  # dims may hold lists
        runs.setdefault(key, (list(value), []))[1].append(int(parts[at]))
    for (head, tail, _), (value, numbers) in runs.items():
        numbers.sort()
        start = prev = numbers[0]
        for n in [*numbers[1:], None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            index = str(start) if start == prev else f"{{{start}..{prev}}}"
            out[".".join(p for p in (head, index, tail) if p)] = list(value)
            if n is not None:
                start = prev = n
    return dict(sorted(out.items()))


def unfold_names(folded: Any, limit: int, path: Path) -> dict[str, Any]:
    """Expand the ``{a..b}`` runs of a version 3 ``modules`` object (at most one per key, ``a < b``,
    at most ``limit`` modules in all: each module takes data bytes), refusing a key that is not in the
    canonical form :func:`fold_names` writes. Returns ``{module path: dims as given}`` (checked by
    :func:`~lordba.format.header.check_modules`); raises :class:`AdapterFormatError` naming ``path``."""
    if not isinstance(folded, dict) or not folded:
        raise AdapterFormatError(f"{path}: metadata 'modules' must be a non-empty object of [in, out, r]")
    dims: dict[str, Any] = {}
    for key, value in folded.items():
        ranges = list(_RANGE.finditer(key))
        if len(ranges) > 1:
            raise AdapterFormatError(f"{path}: metadata 'modules' key {safe_repr(key)} holds more than one range")
        if not ranges:
            names = [key]
        else:
            first, last = int(ranges[0].group(1)), int(ranges[0].group(2))
            if first >= last or len(dims) + last - first + 1 > limit:
                raise AdapterFormatError(
                    f"{path}: metadata 'modules' key {safe_repr(key)}: range {first}..{last} is empty, a single "
                    f"index or more modules than the file's {limit} can hold"
                )
            head, tail = key[: ranges[0].start()], key[ranges[0].end() :]
            names = [f"{head}{i}{tail}" for i in range(first, last + 1)]
        for name in names:
            if name in dims:
                raise AdapterFormatError(f"{path}: metadata 'modules' names module {safe_repr(name)} twice")
            dims[name] = value
        if len(dims) > limit:
            raise AdapterFormatError(f"{path}: metadata 'modules' names more modules than the file can hold")
    ok = all(isinstance(v, list) for v in dims.values()) and fold_names(dims) == folded
    if not ok or list(folded) != sorted(folded):
        raise AdapterFormatError(
            f"{path}: metadata 'modules' is not in the canonical folded form (sorted keys, maximal runs "
            "of consecutive indices with equal dims)"
        )
    return dims


def compact_metadata(scale_dtype: str, modules: dict[str, ModuleRecord], config_sha256: str | None) -> dict[str, str]:
    """The ``__metadata__`` of a version 3 file: format, version, scale dtype, the folded ``modules``
    (:func:`fold_names`) and, if given, ``config_sha256``."""
    dims = {n: [r.in_features, r.out_features, r.r] for n, r in modules.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(COMPACT_FORMAT_VERSION),
        "scale_dtype": scale_dtype,
        "modules": json.dumps(fold_names(dims), separators=(",", ":"), sort_keys=True),
    }
    if config_sha256 is not None:
        metadata["config_sha256"] = config_sha256
    return metadata


def kind_specs(
    modules: dict[str, ModuleRecord], scale_dtype: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...], list[int]]]:
    """Per kind: its dtype, its shape ``[total]`` and each module's start (in elements), modules in
    sorted order. Raises :class:`ConfigError` for an unknown ``scale_dtype``."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...], list[int]]] = {}
    sizes = [_sizes((r.in_features, r.out_features, r.r), scale_dtype) for _, r in sorted(modules.items())]
    for i, kind in enumerate(TENSOR_KINDS):
        starts, total, dtype = [], 0, torch.uint8
        for per_kind in sizes:
            dtype, n, _ = per_kind[i]
            starts.append(total)
            total += n
        specs[kind] = (dtype, (total,), starts)
    return specs


def check_compact_header(
    header: dict[str, Any], metadata: dict[str, str], config: Any, path: Path, data_bytes: int
) -> tuple[dict[str, ModuleRecord], dict[str, Span]]:
    """Check a version 3 header against ``config`` and the ``data_bytes`` that follow it: metadata,
    the folded module list, then exactly the five kind tensors (dtype, ``[total]`` shape from the
    dims, byte ranges) and any extras. Returns the modules (sorted) and the spans of the kind and
    extra tensors; raises :class:`AdapterFormatError` naming ``path`` and the field or tensor."""
    check_metadata(metadata, config, path)
    modules, expected = _layout(metadata.get("modules", ""), max(data_bytes // 2, 1), config, path)
    extras = extra_entries(header, metadata, path)
    spans = check_tensor_set(header, expected, extras, path)
    check_contiguous(spans, data_bytes, path)
    return modules, spans


_LAYOUTS: dict[tuple, tuple[tuple[tuple[str, int, int, int], ...], list]] = {}  # checked layouts, newest last
_LAYOUTS_KEPT = 64


def _layout(
    text: str, limit: int, config: Any, path: Path
) -> tuple[dict[str, ModuleRecord], list[tuple[str, torch.dtype, tuple[int, ...], int]]]:
    """The modules of a version 3 ``modules`` metadata string (``limit``: at most that many) checked
    against ``config`` (:func:`unfold_names`, :func:`~lordba.format.header.check_modules`), as fresh
    records in sorted order, and the five kind tensors the file must hold ``(name, dtype, shape,
    bytes)``. A layout that passed is kept (the last :data:`_LAYOUTS_KEPT`, keyed by the string and
    every config field those checks read): a fleet of adapters of one model shares a few, and a
    server loads them by the thousand. A refused one is checked, and refused, every time."""
    key = (
        text,
        limit,
        config.scale_dtype,
        config.r,
        *map(repr, (config.rank_pattern, config.target_modules, config.exclude_modules)),
        *map(repr, (config.layers_to_transform, config.layers_pattern)),
    )
    layout = _LAYOUTS.get(key)
    if layout is None:
        folded = parse_json(text.encode("utf-8", "surrogatepass"), f"{path}: metadata 'modules'")
        dims = unfold_names(folded, limit, path)  # a module takes at least 2 sign bytes
        checked = check_modules(dict(sorted(dims.items())), config, path)
        specs = kind_specs(checked, config.scale_dtype)
        expected = [(k, d, shape, shape[0] * _itemsize(d)) for k, (d, shape, _) in specs.items()]
        layout = (tuple((r.path, r.in_features, r.out_features, r.r) for r in checked.values()), expected)
        while len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.pop(next(iter(_LAYOUTS)), None)
        _LAYOUTS[key] = layout
    names, expected = layout
    return {name: ModuleRecord(name, i, o, r) for name, i, o, r in names}, list(expected)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def compact_tensors(modules: dict[str, ModuleRecord], scale_dtype: str) -> dict[str, torch.Tensor]:
    """The five kind tensors of a version 3 file from modules holding their stored tensors (checked
    by the caller): each module's tensors concatenated in sorted order, ``int4`` codes packed."""
    out = {}
    for kind in TENSOR_KINDS:
        parts = []
        for name in sorted(modules):
            t = modules[name].tensors[kind].detach().cpu().reshape(-1)
            if scale_dtype in NIBBLE_DTYPES and kind in ("scale_in", "scale_out"):
                t = pack_nibbles(t)
            parts.append(t)
        out[kind] = torch.cat(parts)
    return out


def split_tensors(
    tensors: dict[str, torch.Tensor], modules: dict[str, ModuleRecord], scale_dtype: str, path: Path
) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """Fill each module's ``tensors`` with views of the kind tensors read from a version 3 file
    (``int4``: of the decoded codes, whose padding nibbles must be zero). Returns, per kind, the
    whole (decoded) tensor and each module's start in it, modules in sorted order (what
    :func:`~lordba.format.values.check_all_values` checks the values of at once). Raises
    :class:`AdapterFormatError` naming the file and tensor for an invalid nibble or a non-zero
    padding nibble."""
    records = [modules[n] for n in sorted(modules)]
    sizes = [_sizes((r.in_features, r.out_features, r.r), scale_dtype) for r in records]
    for rec in records:
        rec.tensors = {}
    kinds = {}
    for i, kind in enumerate(TENSOR_KINDS):
        whole, nibbles = tensors[kind], scale_dtype in NIBBLE_DTYPES and kind in ("scale_in", "scale_out")
        if nibbles:
            whole = _decode_nibbles(whole, records, kind, path)
        lengths = [per_kind[i][2] for per_kind in sizes]
        starts = list(itertools.accumulate((2 * p[i][1] if nibbles else p[i][1] for p in sizes[:-1]), initial=0))
        kinds[kind] = (whole, starts)
        if not nibbles and sum(lengths) == whole.numel() and all(p[i][1] == p[i][2] for p in sizes):
            for rec, view in zip(records, whole.split(lengths)):  # one call: the views of every module
                rec.tensors[kind] = view
            continue
        for rec, start, n in zip(records, starts, lengths):
            rec.tensors[kind] = whole[start : start + n]
    return kinds


def _decode_nibbles(packed: torch.Tensor, records: list[ModuleRecord], kind: str, path: Path) -> torch.Tensor:
    """int8 codes of every nibble of a kind tensor (two per byte), after checking that none is the
    invalid nibble 8 and that each odd-length module's padding nibble is 0."""
    codes = unpack_nibbles(packed)
    if bool((codes == -128).any()):
        at = int((codes == -128).nonzero()[0]) // 2
        raise AdapterFormatError(f"{path}: tensor {kind}: byte {at} holds the invalid 4-bit index -8")
    start = 0
    for rec in records:
        n = rec.in_features if kind == "scale_in" else rec.out_features
        if n % 2 and int(codes[start + n]) != 0:
            raise AdapterFormatError(f"{path}: tensor {rec.path}.{kind}: non-zero padding nibble (corrupt)")
        start += n + n % 2
    return codes
