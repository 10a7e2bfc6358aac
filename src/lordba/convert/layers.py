"""Converting a LoRA adapter's layers, in batches of equal shape, at given ranks: the step shared by
the plain conversion (:mod:`lordba.convert.pipeline`) and the one at a byte budget
(:mod:`lordba.convert.allocate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lordba.convert.groups import SolverOptions, solve_group
from lordba.convert.peft_reader import LoraAdapter, LoraLayer
from lordba.core.packing import pack_signs
from lordba.core.scales import get_codec
from lordba.errors import ConversionError
from lordba.format.header import ModuleRecord


def _groups(layers: Sequence[LoraLayer], ranks: dict[str, int], max_batch: int) -> list[list[LoraLayer]]:
    by_shape: dict[tuple[int, int, int, int], list[LoraLayer]] = {}
    for layer in layers:
        key = (layer.out_features, layer.in_features, layer.r, ranks[layer.path])
        by_shape.setdefault(key, []).append(layer)
    return [group[i : i + max_batch] for key in sorted(by_shape) for group in [by_shape[key]]
            for i in range(0, len(group), max_batch)]  # fmt: skip


def convert_layers(
    lora: LoraAdapter,
    ranks: dict[str, int],
    scalings: dict[str, float],
    scale_dtype: str,
    opts: SolverOptions,
    calibration: dict[str, torch.Tensor] | None,
    max_batch: int,
    progress: Any,
) -> tuple[dict[str, ModuleRecord], dict[str, dict[str, Any]]]:
    """Convert every layer of ``lora`` at ``ranks`` (``{path: rank}``), with the LoRDBA scalings
    ``scalings`` (``{path: s}``), in groups of equal shape of at most ``max_batch`` layers; ``progress``
    is a bar from :func:`progress_bar` or ``None``. Returns the stored records and per-layer
    statistics, ``{path: ModuleRecord}`` and ``{path: {name: value}}``; raises
    :class:`ConversionError` if ``calibration`` misses a module or holds a bad vector, or a layer's scales do not
    fit ``scale_dtype`` (:meth:`~lordba.convert.groups.GroupResult.check_stored`)."""
    codec = get_codec(scale_dtype)
    records, stats = {}, {}
    for group in _groups(list(lora.layers.values()), ranks, max_batch):
        r = ranks[group[0].path]
        A = torch.stack([layer.A for layer in group])
        B = torch.stack([layer.B for layer in group])
        factor = torch.tensor([layer.scaling / scalings[layer.path] for layer in group], dtype=torch.float64)
        moments = None
        if calibration is not None:
            missing = [layer.path for layer in group if layer.path not in calibration]
            if missing:
                raise ConversionError(f"calibration has no statistics for module(s) {missing[:4]}")
            for layer in group:
                v = calibration[layer.path]
                if not (isinstance(v, torch.Tensor) and v.shape == (layer.in_features,) and v.is_floating_point()):
                    what = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ConversionError(
                        f"calibration statistics for {layer.path!r} must be a float tensor of shape "
                        f"[{layer.in_features}] (mean x² per input channel), got {what}"
                    )
                if not bool((torch.isfinite(v) & (v >= 0)).all()):  # a mean of squares: never negative
                    raise ConversionError(
                        f"calibration statistics for {layer.path!r} must be finite and non-negative "
                        "(mean x² per input channel)"
                    )
            moments = torch.stack([calibration[layer.path].float() for layer in group])
        res = solve_group(B, A, r, factor, codec, opts, moments)
        res.check_stored(scale_dtype, [layer.path for layer in group])
        f = res.factors
        for i, layer in enumerate(group):
            scale_in, scale_mid, scale_out = codec.encode(f.b[i], f.m[i], f.a[i])
            records[layer.path] = ModuleRecord(
                layer.path,
                layer.in_features,
                layer.out_features,
                r,
                {
                    "sign_A": pack_signs(f.sign_A[i]),
                    "sign_B": pack_signs(f.sign_B[i]),
                    "scale_in": scale_in.contiguous(),
                    "scale_mid": scale_mid.contiguous(),
                    "scale_out": scale_out.contiguous(),
                },
            )
            stats[layer.path] = {
                "delta_norm": float(res.target_norm[i]) * scalings[layer.path],
                "rel_error": float(res.rel_error[i]),
                "rel_error_float": float(res.rel_error_float[i]),
                "rel_error_init": float(res.rel_error_init[i]),
                "rel_error_weighted": None if res.rel_error_weighted is None else float(res.rel_error_weighted[i]),
                "rmr_A": float(res.rmr_A[i]),
                "rmr_B": float(res.rmr_B[i]),
                "rmr_A_gauge": float(res.rmr_A_gauge[i]),
                "rmr_B_gauge": float(res.rmr_B_gauge[i]),
                "gauge": res.gauges[i],
                "iterations": int(res.iterations[i]),
            }
        if progress is not None:
            progress.update(len(group))
    return records, stats


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar of ``total`` layers labelled ``desc``, or ``None`` unless ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer")
