"""Conversion at a byte budget: convert every layer at candidate ranks, allocate, keep the chosen.

The uniform rank that fits the same budget is always among the candidates, so the report compares
the allocation with it on identical conversions. No layer is converted at a rank above its
:func:`~lordba.convert.budget.rank_limit` (the uniform rank is capped there, per layer).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from lordba._util.patterns import path_key
from lordba.config import LoRDBAConfig
from lordba.convert.budget import Allocation, allocate, rank_limit
from lordba.convert.groups import SolverOptions
from lordba.convert.layers import convert_layers, progress_bar
from lordba.convert.peft_reader import LoraAdapter
from lordba.errors import ConfigError
from lordba.format.header import ModuleRecord
from lordba.format.sizes import payload_bytes, size_report


def convert_at_budget(
    lora: LoraAdapter,
    base: LoRDBAConfig,
    target_bpw: float,
    opts: SolverOptions,
    calibration: dict[str, torch.Tensor] | None,
    max_batch: int,
    progress: bool,
    candidates: Sequence[int],
) -> tuple[LoRDBAConfig, dict[str, ModuleRecord], dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-layer ranks for ``target_bpw`` (LoRA basis, whole file); returns the final config, the
    stored records, per-layer statistics and the allocation summary."""
    dtype = base.scale_dtype
    dims = {p: (layer.in_features, layer.out_features) for p, layer in lora.layers.items()}
    lora_params = sum(layer.r * (layer.in_features + layer.out_features) for layer in lora.layers.values())
    allowed = math.floor(target_bpw * lora_params / 8)
    limits = {p: rank_limit(i, o) for p, (i, o) in dims.items()}
    top = min(max(max(candidates), 1), max(limits.values()))  # a candidate above every limit converts nothing
    least = _file_bytes(dims, dict.fromkeys(dims, 1), dtype)
    if least > allowed:
        raise ConfigError(
            f"target_bpw={target_bpw:g} is below the smallest possible size (rank 1 everywhere: "
            f"{math.ceil(8000 * least / lora_params) / 1000:.3f} BPW on the LoRA basis with scale_dtype={dtype})"
        )
    r_uniform = _raised(dims, 1, limits, allowed, dtype)  # capped at each layer's limit: the bytes capped layers free
    uniform_ranks = _capped(r_uniform, limits)
    probe = size_report({p: (i, o, max(top, r_uniform)) for p, (i, o) in dims.items()}, dtype)
    overhead = probe.file_bytes - probe.payload_bytes  # header; an upper bound (rank digits)
    budget = allowed - overhead
    ranks = sorted({c for c in candidates if 1 <= c <= max(top, r_uniform)} | {r_uniform})
    per_layer = {p: sorted({r for r in ranks if r <= limits[p]} | {uniform_ranks[p]}) for p in dims}
    converted = sorted({r for rs in per_layer.values() for r in rs})
    results: dict[int, tuple[dict[str, ModuleRecord], dict[str, dict[str, Any]]]] = {}
    bar = progress_bar(sum(map(len, per_layer.values())), progress, f"converting at ranks {ranks}")
    try:
        for r in converted:
            at = {p: lora.layers[p] for p in dims if r in per_layer[p]}  # not above a layer's limit
            scalings = {p: base.alpha_for(p) / r for p in at}
            results[r] = convert_layers(
                dataclasses.replace(lora, layers=at), dict.fromkeys(at, r), scalings, dtype, opts, calibration,
                max_batch, bar
            )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    norms = _output_norms(lora, calibration)
    curves = {
        p: {
            r: (payload_bytes(i, o, r, dtype), _squared_error(results[r][1][p], None if norms is None else norms[p]))
            for r in per_layer[p]
        }
        for p, (i, o) in dims.items()
    }
    uniform = Allocation(
        uniform_ranks,
        sum(curves[p][r][0] for p, r in uniform_ranks.items()),
        sum(curves[p][r][1] for p, r in uniform_ranks.items()),
    )  # fits: checked above
    alloc = _fitting(curves, budget, allowed, dims, dtype)
    if alloc is None or uniform.squared_error <= alloc.squared_error:  # mixed ranks' header can cost more
        alloc = uniform
    common = Counter(alloc.ranks.values()).most_common(1)[0][0]
    final = dataclasses.replace(
        base, r=common, rank_pattern={path_key(p): r for p, r in alloc.ranks.items() if r != common}
    )
    records = {p: results[r][0][p] for p, r in alloc.ranks.items()}
    stats = {p: results[r][1][p] for p, r in alloc.ranks.items()}
    norm2 = sum((s["delta_norm"] if norms is None else norms[p]) ** 2 for p, s in stats.items()) or 1.0
    file_bytes = _file_bytes(dims, alloc.ranks, dtype)
    uniform_file = _file_bytes(dims, uniform.ranks, dtype)
    summary = {
        "target_bpw": target_bpw,
        "allowed_file_bytes": allowed,
        "budget_payload_bytes": budget,
        "candidates": ranks,
        "rank_histogram": {str(r): n for r, n in sorted(Counter(alloc.ranks.values()).items())},
        "payload_bytes": alloc.payload_bytes,
        "file_bytes": file_bytes,
        "bpw_lora": 8 * file_bytes / lora_params,
        "objective": "ΔW error" if norms is None else "output error on the calibration inputs",
        "total_rel_error": math.sqrt(alloc.squared_error / norm2),
        "uniform_rank": r_uniform,
        "uniform_file_bytes": uniform_file,
        "uniform_bpw_lora": 8 * uniform_file / lora_params,
        "uniform_total_rel_error": math.sqrt(uniform.squared_error / norm2),
        "curves": {p: {str(r): results[r][1][p]["rel_error"] for r in per_layer[p]} for p in sorted(dims)},
    }
    return final, records, stats, summary


def _capped(r: int, limits: dict[str, int]) -> dict[str, int]:
    """Rank ``r`` for every layer, but not above its limit (``limits``: path → :func:`rank_limit`)."""
    return {p: min(r, limit) for p, limit in limits.items()}


def _raised(dims: dict[str, tuple[int, int]], r: int, limits: dict[str, int], allowed: int, dtype: str) -> int:
    """The largest rank from ``r`` (whose capped file fits) up to the largest limit whose uniform file, every layer
    capped at its limit (:func:`_capped`), its own header included, fits in ``allowed`` bytes: the bytes that layers
    capped below it leave go to the other layers (bisection; the file grows with the rank)."""
    lo, hi = r, max(limits.values())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _file_bytes(dims, _capped(mid, limits), dtype) <= allowed:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _output_norms(lora: LoraAdapter, calibration: dict[str, torch.Tensor] | None) -> dict[str, float] | None:
    """``{path: ‖ΔW diag(√E[x²])‖_F}``: each layer's update in the units of its output on the
    calibration inputs (``None`` without calibration)."""
    if calibration is None:
        return None
    norms = {}
    for path, layer in lora.layers.items():
        delta = layer.scaling * (layer.B.double() @ layer.A.double())
        norms[path] = float((delta * calibration[path].double().clamp(min=0).sqrt()).norm())
    return norms


def _squared_error(stats: dict[str, Any], output_norm: float | None) -> float:
    """What the allocation minimises for one layer at one rank: the squared error of its update (ΔW,
    Frobenius), or with calibration of its output on the calibration inputs (the error the
    activation-weighted solver minimised, ``‖(ΔW − ΔŴ) diag(√E[x²])‖²``: a layer whose inputs are
    large counts for more)."""
    if output_norm is None:
        return (stats["rel_error"] * stats["delta_norm"]) ** 2
    return (stats["rel_error_weighted"] * output_norm) ** 2


def _file_bytes(dims: dict[str, tuple[int, int]], ranks: dict[str, int], dtype: str) -> int:
    return size_report({p: (i, o, ranks[p]) for p, (i, o) in dims.items()}, dtype).file_bytes


def _fitting(
    curves: dict, budget: int, allowed: int, dims: dict[str, tuple[int, int]], dtype: str
) -> Allocation | None:
    """The allocation of the largest payload budget up to ``budget`` whose whole file fits in ``allowed``
    bytes (bisection on the budget), or ``None``: mixed ranks make the header larger than the uniform
    one ``budget`` was derived from (the compact header then stores every module's rank)."""
    lo, hi, best = sum(min(b for b, _ in c.values()) for c in curves.values()), budget, None
    while lo <= hi:
        mid = (lo + hi) // 2
        alloc = allocate(curves, mid)
        if _file_bytes(dims, alloc.ranks, dtype) <= allowed:
            best, lo = alloc, mid + 1
        else:
            hi = mid - 1
    return best
