"""``convert_lora``: a trained PEFT LoRA adapter → a LoRDBA adapter (``mode="ptq"``) and a report.

Layers of equal shape and rank are converted together in batches (``max_batch`` layers bound the
working memory). With ``target_bpw`` each layer is converted at several candidate ranks and
:mod:`lordba.convert.budget` picks the ranks; the uniform rank at the same bytes is reported beside.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lordba._util.patterns import path_key
from lordba.config import LoRDBAConfig, read_config_json
from lordba.convert.allocate import convert_at_budget
from lordba.convert.budget import DEFAULT_CANDIDATES, MAX_TARGET_BPW, rank_limit
from lordba.convert.groups import SolverOptions
from lordba.convert.layers import convert_layers, progress_bar
from lordba.convert.peft_reader import LoraAdapter, read_peft_dir, read_peft_model
from lordba.convert.report import SIDECAR_NAME, ConversionReport, LayerReport
from lordba.errors import ConfigError, ConversionError, LoRDBAError
from lordba.format.adapter import AdapterState, read_adapter
from lordba.format.atomic import atomic_directory, check_replaceable
from lordba.format.sizes import lora_file_bytes, payload_bytes, size_report


def read_lora(
    source: Any, adapter_name: str | None = None, allow_pickle: bool = False, skip_unsupported: bool = False
) -> LoraAdapter:
    """A PEFT LoRA adapter from a directory or an in-memory ``peft.PeftModel``. ``adapter_name``: the
    adapter to read; left out, ``"default"`` of a directory, the one active adapter of a ``PeftModel``."""
    if isinstance(source, LoraAdapter):
        return source
    if isinstance(source, (str, Path)):
        return read_peft_dir(
            source, "default" if adapter_name is None else adapter_name, allow_pickle, skip_unsupported
        )
    if hasattr(source, "peft_config") and hasattr(source, "base_model"):
        return read_peft_model(source, adapter_name, skip_unsupported)
    raise ConversionError(
        f"convert_lora takes a PEFT adapter directory or a peft.PeftModel, got {type(source).__name__}"
    )


def default_config(lora: LoraAdapter) -> LoRDBAConfig:
    """The LoRDBA config a conversion uses by default: the LoRA's ranks (per module) and ``alpha = lora_alpha``."""
    differing = {path_key(p): layer.r for p, layer in lora.layers.items() if layer.r != lora.r}
    return LoRDBAConfig(r=lora.r, alpha=float(lora.alpha), rank_pattern=differing)


def _base_config(
    lora: LoraAdapter, config: LoRDBAConfig | None, r: int | None, scale_dtype: str | None
) -> LoRDBAConfig:
    targets = sorted({p.rsplit(".", 1)[-1] for p in lora.layers})
    if config is None:
        config = default_config(lora)
    changes: dict[str, Any] = {"mode": "ptq", "target_modules": targets, "exclude_modules": None}
    if r is not None:
        changes.update(r=r, rank_pattern={})
    if scale_dtype is not None:
        changes["scale_dtype"] = scale_dtype
    if config.base_model_name_or_path is None and lora.base_model_name_or_path:
        changes["base_model_name_or_path"] = lora.base_model_name_or_path
    changes.update(lora.fields)  # the PEFT fields it carries (modules_to_save, task_type, bias, ...)
    config = dataclasses.replace(config, **changes)
    # a module PEFT targeted by its full path, outside layers_to_transform (PEFT's rule lets it in): named in full
    outside = [p for p in sorted(lora.layers) if not config.in_layers(p)]
    return dataclasses.replace(config, target_modules=targets + outside) if outside else config


def convert_lora(
    source: Any,
    config: LoRDBAConfig | None = None,
    *,
    r: int | None = None,
    target_bpw: float | None = None,
    scale_dtype: str | None = None,
    iters: int = 30,
    tol: float = 1e-3,
    gauge: str = "svd",
    method: str = "admm+bcd",
    calibration: dict[str, torch.Tensor] | None = None,
    adapter_name: str | None = None,
    allow_pickle: bool = False,
    skip_unsupported: bool = False,
    rank_candidates: Sequence[int] | None = None,
    max_batch: int = 32,
    progress: bool = True,
    options: SolverOptions | None = None,
) -> tuple[AdapterState, ConversionReport]:
    """Convert a PEFT LoRA adapter (directory or ``peft.PeftModel``) into a LoRDBA adapter.

    Ranks: ``r`` (uniform) or ``target_bpw`` (per-layer ranks at that many file bits per LoRA
    parameter, LoRA basis) or, by default, the config's ranks (without ``config``: the LoRA's own
    ranks, ``alpha = lora_alpha``). ``config`` supplies ``r``, ``alpha``, ``rank_pattern``,
    ``alpha_pattern``, ``scale_dtype`` and the training fields; ``mode`` becomes ``"ptq"`` and
    ``target_modules`` the LoRA's modules. ``adapter_name``: left out, ``"default"`` of a directory, the
    one active adapter of a ``PeftModel``. ``calibration``: ``{path: mean x² per input channel}``
    (see :func:`~lordba.convert.collect_input_moments`) for the activation-weighted objective.
    Returns the in-memory adapter (``save_pretrained``, ``export_lora``, ``load_adapter_state``)
    and a :class:`~lordba.convert.ConversionReport`.
    """
    start = time.perf_counter()
    for name, value, kind in (("config", config, LoRDBAConfig), ("options", options, SolverOptions)):
        if value is not None and not isinstance(value, kind):
            raise ConfigError(f"convert_lora: {name} must be a {kind.__name__} or None, got {type(value).__name__}")
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
        raise ConfigError(f"convert_lora: adapter_name must be a non-empty string or None, got {adapter_name!r}")
    if r is not None and target_bpw is not None:
        raise ConfigError("give either r or target_bpw, not both")
    if target_bpw is not None and not (_is_number(target_bpw) and math.isfinite(target_bpw) and target_bpw > 0):
        raise ConfigError(f"target_bpw must be a positive finite number, got {target_bpw!r}")
    if target_bpw is not None and target_bpw > MAX_TARGET_BPW:  # else a search and a conversion without end
        raise ConfigError(
            f"target_bpw must be at most {MAX_TARGET_BPW:g} (the LoRA itself in float32), got {target_bpw!r}"
        )
    if not (_is_int(max_batch) and max_batch >= 1):
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    if rank_candidates is not None:
        rank_candidates = _candidates(rank_candidates)
    opts = options or SolverOptions(gauge=gauge, method=method, iters=iters, tol=tol)
    lora = read_lora(source, adapter_name, allow_pickle, skip_unsupported)
    base = _base_config(lora, config, r, scale_dtype)
    allocation = None
    if target_bpw is None:
        ranks = {p: base.rank_for(p) for p in lora.layers}
        _check_ranks(lora, ranks)
        scalings = {p: base.scaling_for(p) for p in lora.layers}
        bar = progress_bar(len(lora.layers), progress, "converting")
        try:
            records, stats = convert_layers(lora, ranks, scalings, base.scale_dtype, opts, calibration, max_batch, bar)
        finally:
            if bar is not None:
                bar.close()
        final = base
    else:
        final, records, stats, allocation = convert_at_budget(
            lora, base, float(target_bpw), opts, calibration, max_batch, progress, rank_candidates or DEFAULT_CANDIDATES
        )
    state = AdapterState(final, dict(sorted(records.items())), extras=lora.extras)
    report = _report(lora, state, stats, opts, allocation)
    report.seconds = time.perf_counter() - start
    return state, report


def _check_ranks(lora: LoraAdapter, ranks: dict[str, int]) -> None:
    """Refuse, before any work, a rank whose sign factors alone hold more bits than the layer's ΔW in float32
    (``r (in + out) > 32 in out``): no use, and its solve allocates without bound (``r = 10**6`` ran a minute
    on a 40×40 layer, then failed to allocate 16 TB). Ranks above ``min(in, out)`` below it are valid."""
    for path, r in sorted(ranks.items()):
        layer = lora.layers[path]
        i, o = layer.in_features, layer.out_features
        if r > (limit := rank_limit(i, o)):
            raise ConfigError(
                f"module {path!r} ({o}×{i}): r={r} is above {limit}, the rank at which its sign factors alone "
                "hold more bits than its ΔW in float32 (32·in·out / (in + out))"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _candidates(value: Any) -> list[int]:
    """``rank_candidates`` as a list of positive integers; :class:`ConfigError` otherwise."""
    items = list(value) if isinstance(value, (list, tuple, range, set, frozenset)) else None
    if not items or not all(_is_int(c) and c >= 1 for c in items):
        raise ConfigError(f"rank_candidates must be a non-empty list of positive integers, got {value!r}")
    return [int(c) for c in items]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _report(
    lora: LoraAdapter, state: AdapterState, stats: dict[str, dict[str, Any]], opts: SolverOptions, allocation: Any
) -> ConversionReport:
    dtype = state.config.scale_dtype
    uniform_lora_rank = len({layer.r for layer in lora.layers.values()}) == 1
    size = size_report(state.dims(), dtype, r_ref=lora.r if uniform_lora_rank else None)
    lora_params = sum(layer.r * (layer.in_features + layer.out_features) for layer in lora.layers.values())
    layers = []
    for path, rec in state.modules.items():
        src = lora.layers[path]
        payload = payload_bytes(rec.in_features, rec.out_features, rec.r, dtype)
        layers.append(
            LayerReport(
                path=path,
                in_features=rec.in_features,
                out_features=rec.out_features,
                r_lora=src.r,
                r=rec.r,
                lora_scaling=src.scaling,
                payload_bytes=payload,
                bpw_lora=8 * payload / (src.r * (rec.in_features + rec.out_features)),
                bpw_dw=8 * payload / (rec.in_features * rec.out_features),
                **stats[path],
            )
        )
    return ConversionReport(
        source=lora.source,
        scale_dtype=dtype,
        solver=dataclasses.asdict(opts),
        layers=layers,
        size=size,
        bpw_lora=8 * size.file_bytes / lora_params,
        lora_fp16_file_bytes=lora_file_bytes({p: (x.in_features, x.out_features, x.r) for p, x in lora.layers.items()}),
        allocation=allocation,
        extra_tensor_bytes=sum(t.numel() * t.element_size() for t in state.extras.values()),
    )


def check_output_dir(out_dir: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Refuse (before any work) an output directory that exists (unless ``overwrite``), whose
    replacement would delete the ``source`` adapter or the current directory (it is one of them or
    a parent), or whose parent cannot be written. Returns the output path; raises
    :class:`ConversionError`."""
    import os

    try:
        check_replaceable(out_dir, overwrite, _inputs(source))
    except LoRDBAError as err:
        raise ConversionError(str(err)) from None
    out = Path(out_dir)
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"{out}: cannot be created ({parent} is not a writable directory)")
    return out


def _inputs(source: str | Path | None) -> tuple[str | Path, ...]:
    return (source,) if isinstance(source, (str, Path)) and Path(source).exists() else ()


def save_converted(
    state: AdapterState,
    report: ConversionReport | None,
    out_dir: str | Path,
    overwrite: bool = False,
    source: str | Path | None = None,
) -> Path:
    """Write the converted adapter (and the ``conversion_report.json`` sidecar) to ``out_dir``
    atomically: on any error no partial directory is left behind. ``source`` (default: the report's
    source directory) is never replaced. What is written is read back with the loader's checks
    before it is moved into place: lordba never writes an adapter it cannot read. Returns the output
    path; raises :class:`ConversionError`."""
    source = source if source is not None else (report.source if report is not None else None)
    out = check_output_dir(out_dir, overwrite, source)
    written: list[Path] = []  # the temporary folder, which the save's own errors name (and which is gone then)
    try:
        with atomic_directory(out, overwrite=overwrite, keep=_inputs(source)) as tmp:
            written.append(tmp)
            state.save_pretrained(tmp)
            if report is not None:  # for these weights only: a later save into the folder leaves it behind
                sha = read_config_json(tmp).get("weights_sha256")
                report.write_json(tmp / SIDECAR_NAME, timing=False, weights_sha256=sha)
            _read_back(tmp, out)
    except LoRDBAError as err:
        if isinstance(err, ConversionError) or type(err) is not LoRDBAError:
            raise
        raise ConversionError(str(err).replace(str(written[0]), str(out)) if written else str(err)) from None
    except OSError as err:
        raise ConversionError(f"{out}: cannot write the converted adapter ({err.strerror or err})") from None
    return out


def _read_back(tmp: Path, out: Path) -> None:
    """Read a just-written adapter with every check of the loader; :class:`ConversionError` if it fails."""
    try:  # a recovered read is refused below, not warned about (warnings.catch_warnings, which silenced it, is not
        # thread-safe: other threads' warnings were silenced meanwhile, and its filter could outlive it)
        recovered = read_adapter(tmp, warn_recovered=False).recovered  # reading backups: the write went wrong
    except LoRDBAError as err:
        raise ConversionError(f"{out}: refusing to write a converted adapter lordba cannot read back ({err})") from None
    if recovered:
        raise ConversionError(f"{out}: the converted adapter did not read back as written (an interrupted save?)")
