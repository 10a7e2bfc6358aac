"""The values of a loaded adapter's tensors, checked after the header: zero padding bits of the
packed signs, finite float scales, and for the code formats (``int8``, ``int4``) codes of the format
reaching ±127 unless the vector is all zero. One vectorised pass per tensor kind
(:func:`check_all_values`); where it fails, the per-module check names the tensor at fault."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lordba.core.packing import check_padding
from lordba.core.scales import CODE_DTYPES, INT4_LEVELS
from lordba.errors import AdapterFormatError

ModuleRecord = Any  # lordba.format.header.ModuleRecord (which imports this module): path, dims, tensors
_INT4_OK = torch.zeros(256, dtype=torch.bool)  # int8 code + 128 -> whether it is an int4 code
for _v in INT4_LEVELS:
    _INT4_OK[128 + _v] = _INT4_OK[128 - _v] = True


def check_values(rec: ModuleRecord, scale_dtype: str, path: Path) -> None:
    """Check a loaded module's tensor values: zero padding bits of the signs, finite float scales,
    codes of the format (int8: [-127, 127]; int4: its 15 codes) reaching ±127 unless all zero.
    Raises :class:`AdapterFormatError`."""
    for kind, numel in (("sign_A", rec.r * rec.in_features), ("sign_B", rec.out_features * rec.r)):
        check_padding(rec.tensors[kind], numel, f"{path}: tensor {rec.path}.{kind}")
    for kind in ("scale_in", "scale_mid", "scale_out"):
        t = rec.tensors[kind]
        name = f"{path}: tensor {rec.path}.{kind}"
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{name}: holds NaN or infinite values")
        elif scale_dtype in CODE_DTYPES:
            if bool((t == -128).any()):
                raise AdapterFormatError(f"{name}: int8 code -128 is outside the format's range [-127, 127]")
            if scale_dtype == "int4" and not bool(_INT4_OK[t.to(torch.int64) + 128].all()):
                raise AdapterFormatError(f"{name}: a code outside the int4 format's codes ±{INT4_LEVELS}")
            peak = int(t.abs().max()) if t.numel() else 0
            if peak not in (0, 127):
                raise AdapterFormatError(f"{name}: a non-zero int8 scale vector must reach code ±127 (max is {peak})")


def check_all_values(
    records: Sequence[ModuleRecord],
    scale_dtype: str,
    path: Path,
    kinds: dict[str, tuple[torch.Tensor, Sequence[int]]] | None = None,
) -> None:
    """:func:`check_values` for every record, in one vectorised pass per tensor kind (the loader's
    path: a few tensor ops for the whole file instead of a dozen per module); when anything is
    wrong, the per-module check runs to name the first tensor at fault. ``kinds``: scale kinds
    already held as one tensor (a version 3 file's, decoded) with the start of each module's vector
    in it, checked as they are instead of gathering the records' views again. Raises
    :class:`AdapterFormatError`."""
    if records and not _values_ok(records, scale_dtype, kinds or {}):
        for rec in records:
            check_values(rec, scale_dtype, path)
        raise AdapterFormatError(f"{path}: invalid tensor values")  # not reached: check_values names the fault


def _values_ok(
    records: Sequence[ModuleRecord], scale_dtype: str, kinds: dict[str, tuple[torch.Tensor, Sequence[int]]]
) -> bool:
    """Whether every record passes :func:`check_values` (no message: see :func:`check_all_values`)."""
    for rec in records:  # padding bits: only where r·in or out·r is not a multiple of 8 (rare)
        for kind, numel in (("sign_A", rec.r * rec.in_features), ("sign_B", rec.out_features * rec.r)):
            pad = (-numel) % 8
            packed = rec.tensors[kind]
            if pad and packed.numel() and int(packed[-1]) & ((1 << pad) - 1):
                return False
    for kind in ("scale_in", "scale_mid", "scale_out"):
        groups = [kinds[kind]] if kind in kinds else _gathered(records, kind)
        for whole, starts in groups:
            if whole.is_floating_point():
                if not bool(torch.isfinite(whole).all()):
                    return False
            elif scale_dtype in CODE_DTYPES and not _codes_ok(whole, starts, scale_dtype):
                return False
    return True


def _gathered(records: Sequence[ModuleRecord], kind: str) -> list[tuple[torch.Tensor, list[int]]]:
    """The records' ``kind`` tensors concatenated (one tensor per dtype) with each one's start."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for rec in records:
        t = rec.tensors[kind]
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    out = []
    for group in by_dtype.values():
        starts = np.cumsum([0] + [t.numel() for t in group[:-1]]).tolist()
        out.append((torch.cat(group), starts))
    return out


def _codes_ok(whole: torch.Tensor, starts: Sequence[int], scale_dtype: str) -> bool:
    """int8 codes in [-127, 127] (int4: in its codes), each vector (from its start to the next
    start) reaching ±127 unless all zero (a zero padding code changes no vector's peak)."""
    if bool((whole == -128).any()):
        return False
    if scale_dtype == "int4" and not bool(_INT4_OK[whole.to(torch.int64) + 128].all()):
        return False
    cuts = [s for i, s in enumerate(starts) if s < whole.numel() and (i + 1 == len(starts) or starts[i + 1] > s)]
    if not cuts:
        return True
    peaks = np.maximum.reduceat(np.abs(whole.numpy().astype(np.int16)), cuts)
    return bool(((peaks == 0) | (peaks == 127)).all())
