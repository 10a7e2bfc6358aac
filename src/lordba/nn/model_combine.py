"""``add_weighted_adapter`` (PEFT's method) for :class:`~lordba.nn.model.LoRDBAModel` (a mixin of the model).

It combines exactly by concatenation where it can (:func:`cat_records`); other combinations need the
converter's solver, which lives above ``nn``: :mod:`lordba.convert.combine` registers it here at import
(:func:`register_combiner`), or on first use through its ``lordba.combiners`` entry point.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lordba._util.patterns import path_key
from lordba.config import LoRDBAConfig
from lordba.core.packing import pack_signs
from lordba.core.scales import get_codec
from lordba.errors import AdapterStateError, ConfigError
from lordba.format import adapter as adapter_files

# name -> fn(deltas {path: dense ΔW}, ranks {path: r}, scalings {path: s}, scale_dtype) -> {path: ModuleRecord}
_COMBINERS: dict[str, Callable[..., dict[str, adapter_files.ModuleRecord]]] = {}
COMBINATION_TYPES = ("cat", "linear", "svd")
COMBINER_ENTRY_POINTS = "lordba.combiners"


def _as_list(values: object, name: str) -> list:
    """``values`` (a list, tuple or other iterable of ``add_weighted_adapter``'s argument ``name``) as a list.

    Raises:
        ConfigError: naming ``name``, for a string, ``None`` or anything else that is not an iterable.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ConfigError(f"add_weighted_adapter: {name} must be a list, got {values!r}")
    return list(values)


def _weight(value: object) -> float | None:
    """A weight of ``add_weighted_adapter`` as a float: a finite real number (a Python, NumPy or 0-d tensor one),
    else ``None`` (``True`` / ``False`` included: a flag, not a weight)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (NumPy's bool_ is no Real)
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def register_combiner(name: str, fn: Callable[..., dict[str, adapter_files.ModuleRecord]]) -> None:
    """Register the dense-ΔW → LoRDBA solver under ``name`` (``"dense"``: used by every combination that
    is not an exact concatenation). Called by :mod:`lordba.convert.combine` at import."""
    _COMBINERS[name] = fn


def _registered_combiner(name: str) -> Callable[..., dict[str, adapter_files.ModuleRecord]] | None:
    """The combiner installed as ``name`` in the ``lordba.combiners`` entry points (lordba's own: the converter's
    dense solver), loaded and registered on first use, so that a combination needs no ``import lordba.convert``
    first (the library's layers import one way: ``nn`` names no module above it)."""
    for point in importlib.metadata.entry_points(group=COMBINER_ENTRY_POINTS):
        if point.name == name:
            try:
                register_combiner(name, point.load())
            except Exception as err:  # stale install metadata, a missing dependency: named, not an internal error
                raise AdapterStateError(
                    f"the {COMBINER_ENTRY_POINTS} entry point {name!r} ({point.value}) cannot be loaded: "
                    f"{type(err).__name__}: {err}; reinstall lordba"
                ) from err
    return _COMBINERS.get(name)


class CombineMixin:
    """``add_weighted_adapter`` of :class:`~lordba.nn.model.LoRDBAModel` (which provides ``_lock``,
    ``peft_config``, ``adapter_modules``, ``_check_known`` and ``load_adapter_state``)."""

    # ------------------------------------------------------------------ combination
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "cat",
        svd_rank: int | None = None,
    ) -> None:
        """Add ``adapter_name`` = Σ ``weights[i]`` · ``adapters[i]`` (PEFT's method; not activated).

        ``"cat"`` stacks the signs along the rank (rank Σ r_i) and folds each weight into ``m``: exact
        when the adapters' outer scales are proportional (``a_i ∝ a_j``, ``b_i ∝ b_j``, e.g. an adapter
        combined with itself or scales shared); otherwise it is re-factorised at rank Σ r_i by the
        converter's solver (a warning gives the error). ``"linear"`` (equal ranks) and ``"svd"`` (rank
        ``svd_rank``, default the largest) solve the dense weighted ΔW at that rank. Extra tensors
        (modules trained in full, biases) are not combined. The sources are read under the model's lock
        held shared (one snapshot while other threads hot-swap them). Raises :class:`ConfigError` /
        :class:`AdapterStateError` for bad arguments.
        """
        adapters, weights = _as_list(adapters, "adapters"), _as_list(weights, "weights")
        with self._lock.read():  # the sources as one snapshot: a hot-swap changes their tensors in place
            self._check_combination(adapters, weights, adapter_name, combination_type, svd_rank)
            weights = [_weight(w) for w in weights]  # (floats: NumPy scalars and 0-d tensors too)
            parts = [self.adapter_modules(n) for n in adapters]
            first = self.peft_config[adapters[0]]
            paths = sorted({p for part in parts for p in part})
            ranks = {p: sum(part[p].r for part in parts if p in part) for p in paths}
            if combination_type != "cat":
                fixed = svd_rank or max(a.r for part in parts for a in part.values())
                ranks = {p: fixed for p in paths}
            records = {}
            if combination_type == "cat":
                records = cat_records(parts, weights, first.alpha, ranks, first.scale_dtype)
            rest = [p for p in paths if p not in records]
            if rest:
                records.update(self._dense_combine(parts, weights, rest, ranks, first, combination_type))
        config = _combined_config(first, ranks, combination_type)
        self.load_adapter_state(adapter_files.AdapterState(config, records), adapter_name)

    def _check_combination(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str,
        svd_rank: int | None,
    ) -> None:
        self._check_new_name(adapter_name)  # before the combination: a solve, then a name refused, cost minutes
        if combination_type not in COMBINATION_TYPES:
            raise ConfigError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
        if isinstance(adapters, str) or not adapters or len(adapters) != len(weights):
            raise ConfigError("adapters and weights must be lists of the same, non-zero length")
        if any(_weight(w) is None for w in weights):
            raise ConfigError(f"weights must be finite numbers, got {list(weights)!r}")
        if svd_rank is not None and (type(svd_rank) is not int or svd_rank < 1):
            raise ConfigError(f"svd_rank must be a positive int, got {svd_rank!r}")
        self._check_known(*adapters)
        if combination_type == "linear" and len({self.peft_config[n].r for n in adapters}) > 1:
            raise ConfigError("combination_type='linear' needs adapters of the same rank (use 'cat' or 'svd')")

    def _dense_combine(
        self,
        parts: list,
        weights: Sequence[float],
        paths: list[str],
        ranks: dict[str, int],
        first: LoRDBAConfig,
        kind: str,
    ) -> dict[str, adapter_files.ModuleRecord]:
        combiner = _COMBINERS.get("dense") or _registered_combiner("dense")
        if combiner is None:
            raise AdapterStateError(
                f"combination_type={kind!r} needs the converter's solver: import lordba.convert first"
            )
        deltas = {
            p: sum(float(w) * part[p].delta_weight() for part, w in zip(parts, weights) if p in part) for p in paths
        }
        scalings = {p: first.alpha / ranks[p] for p in paths}
        records, errors = combiner(deltas, ranks, scalings, first.scale_dtype)
        if kind == "cat":
            worst = max(errors.values())
            warnings.warn(
                f"add_weighted_adapter(cat): the adapters' outer scales are not proportional in {len(paths)} "
                f"module(s), so the concatenation was re-factorised (largest relative error {worst:.3g})",
                UserWarning,
                stacklevel=3,
            )
        return records


def cat_records(
    parts: list[dict[str, Any]], weights: Sequence[float], alpha: float, ranks: dict[str, int], scale_dtype: str
) -> dict[str, adapter_files.ModuleRecord]:
    """The exact concatenation of weighted double-binary adapters, per module where it exists.

    With ``a_i = α_i a`` and ``b_i = β_i b`` (proportional outer scales) the weighted sum is
    ``Σ w_i s_i diag(a_i) S_Bi diag(m_i) S_Ai diag(b_i) = s · diag(a) [S_B1 … S_Bk] diag(m) [S_A1; …; S_Ak] diag(b)``
    with ``m = [w_i s_i α_i β_i m_i / s]``: signs stack, ``m`` takes the weights. Returns the records of
    the modules where that holds; the others are left to the solver."""
    codec = get_codec(scale_dtype)
    records = {}
    for path, r in ranks.items():
        held = [(part[path], float(w)) for part, w in zip(parts, weights) if path in part]
        ref = max(held, key=lambda aw: _outer_norm(aw[0]) if aw[1] != 0.0 else -1.0)[0]  # one that adds something
        b_ref, _, a_ref = (v.detach().float() for v in ref.scales())
        s = alpha / r
        mids, signs_A, signs_B = [], [], []
        for adapter, w in held:
            b, m, a = (v.detach().float() for v in adapter.scales())
            if w == 0.0 or not (a.any() and m.any() and b.any()):  # adds nothing: its rank stays, with m = 0
                m = torch.zeros_like(m)
                alpha_i = beta_i = 0.0
            else:
                alpha_i, beta_i = _ratio(a, a_ref), _ratio(b, b_ref)
            if alpha_i is None or beta_i is None:
                break
            mids.append(w * adapter.scaling * alpha_i * beta_i * m / s)
            sign_A, sign_B = adapter.signs()
            signs_A.append(sign_A)
            signs_B.append(sign_B)
        else:
            stored = codec.encode(b_ref, torch.cat(mids), a_ref)
            tensors = {"sign_A": pack_signs(torch.cat(signs_A)), "sign_B": pack_signs(torch.cat(signs_B, dim=1))}
            tensors.update(dict(zip(("scale_in", "scale_mid", "scale_out"), (t.contiguous() for t in stored))))
            rec = adapter_files.ModuleRecord(path, ref.in_features, ref.out_features, r, tensors)
            records[path] = rec
    return records


def _outer_norm(adapter: Any) -> float:
    b, _, a = (v.detach() for v in adapter.scales())
    return float(b.norm() * a.norm())


def _ratio(v: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> float | None:
    """``c`` with ``v = c · ref`` (to ``tol`` relative), or ``None`` if ``v`` is not proportional to ``ref``."""
    den = float(ref.double().square().sum())
    if den == 0.0:
        return 0.0 if float(v.abs().max()) == 0.0 else None
    c = float((v.double() * ref.double()).sum()) / den
    ok = float((v.double() - c * ref.double()).norm()) <= tol * max(float(v.double().norm()), 1e-30)
    return c if ok else None


def _combined_config(first: LoRDBAConfig, ranks: dict[str, int], kind: str) -> LoRDBAConfig:
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {path_key(p): r for p, r in ranks.items() if r != common}  # whole paths: a bare one matches suffixes
    return dataclasses.replace(
        first,
        r=common,
        rank_pattern=pattern,
        alpha_pattern={},
        target_modules=sorted(ranks),
        exclude_modules=None,
        modules_to_save=None,
        task_type=None,
        bias="none",
        mode="ptq",
        layers_to_transform=None,
        layers_pattern=None,
    )
