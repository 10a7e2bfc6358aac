"""Validation of the PEFT side of a conversion, as strict as the reader of lordba's own files.

A PEFT adapter directory is untrusted input like a LoRDBA one: every config field the conversion
uses is type- and range-checked, every pattern is an RE2 pattern (:mod:`lordba._util.patterns`),
every module path is one a LoRDBA file can hold, and the factors must be non-empty, finite and small
enough that ``ΔW = scaling · B A`` and the solver's float32 arithmetic stay finite. LoRAs whose
factors only make sense with a residual base that PEFT modified at initialisation (PiSSA, OLoRA,
LoftQ, CorDA, LoRA-GA) are refused: ``B A`` is not the update of the original weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lordba._util.jsonio import safe_repr
from lordba._util.patterns import check_pattern
from lordba.errors import ConfigError, ConversionError, LoRDBAError
from lordba.format.header import check_module_path

MAX_RANK = (1 << 31) - 1
# |ΔW| entries (bounded by scaling · r · max|A| · max|B|) and factors must stay below this: far
# beyond any trained LoRA (entries ~1), far below float32's 3.4e38 with room for the solver's sums.
MAX_MAGNITUDE = 2.0**100
# init_lora_weights values whose factors need the residual base PEFT wrote at initialisation, as PEFT's
# LoraLayer.update_layer picks the init: prefixes (pissa_niter_4), names, and "olora" in any case ("OLoRA").
_RESIDUAL_PREFIXES = {"pissa": "PiSSA", "corda": "CorDA"}
_RESIDUAL_INITS = {"loftq": "LoftQ", "lora_ga": "LoRA-GA"}


def check_init(cfg: dict[str, Any], where: str) -> None:
    """Refuse a LoRA initialised from (and so paired with) a modified residual base weight.

    Takes the PEFT config fields and the name of their source; returns nothing; raises
    :class:`ConversionError` naming ``init_lora_weights`` (or ``loftq_config``) and the method."""
    init = cfg.get("init_lora_weights", True)
    method = _residual_method(init) if isinstance(init, str) else None
    if method is None and cfg.get("loftq_config"):
        method, init = "LoftQ", f"loftq_config={safe_repr(cfg['loftq_config'])}"
    if method is not None:
        raise ConversionError(
            f"{where}: init_lora_weights={safe_repr(init)}: a {method}-initialised LoRA is trained against a residual "
            "base weight that PEFT changed at initialisation (W - B0 A0, or a quantized residual); its factors are "
            "not an update of the original base, so a conversion cannot be right. Convert the adapter PEFT saves "
            "with path_initial_model_for_weight_conversion (an ordinary LoRA of the original base) instead"
        )


def _residual_method(init: str) -> str | None:
    """The method PEFT runs for the string ``init_lora_weights`` if it changes the base weight, else ``None``."""
    for prefix, method in _RESIDUAL_PREFIXES.items():
        if init.startswith(prefix):
            return method
    return "OLoRA" if init.lower() == "olora" else _RESIDUAL_INITS.get(init)


def check_numbers(cfg: dict[str, Any], where: str) -> tuple[int, float, bool]:
    """``(r, lora_alpha, use_rslora)`` of a PEFT config, each checked (a rank below 2³¹, a positive
    finite alpha, a boolean); raises :class:`ConversionError` naming the field."""
    r, alpha, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), cfg.get("use_rslora", False)
    if type(r) is not int or not 1 <= r <= MAX_RANK:
        raise ConversionError(f"{where}: field r must be a positive integer below 2**31, got {safe_repr(r)}")
    if not _positive_number(alpha):
        raise ConversionError(f"{where}: field lora_alpha must be a positive number (finite), got {safe_repr(alpha)}")
    if type(rslora) is not bool:
        raise ConversionError(f"{where}: field use_rslora must be true or false, got {safe_repr(rslora)}")
    return r, float(alpha), rslora


def check_patterns(cfg: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """``{"rank_pattern": {...}, "alpha_pattern": {...}}`` of a PEFT config: objects whose keys are
    valid RE2 patterns, with ranks below 2³¹ and positive finite alphas as values. Raises
    :class:`ConfigError` (a bad pattern) or :class:`ConversionError` (a bad value), naming the field."""
    out: dict[str, dict[str, Any]] = {}
    for name, ok, what in (
        ("rank_pattern", lambda v: type(v) is int and 1 <= v <= MAX_RANK, "a positive integer below 2**31"),
        ("alpha_pattern", _positive_number, "a positive finite number"),
    ):
        value = cfg.get(name) or {}
        if not isinstance(value, dict):
            raise ConversionError(f"{where}: field {name} must be an object, got {safe_repr(value)}")
        for key, item in value.items():
            try:
                check_pattern(f"{name} key", key)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            if not ok(item):
                raise ConversionError(f"{where}: field {name}[{safe_repr(key)}] must be {what}, got {safe_repr(item)}")
        out[name] = dict(value)
    return out


def check_path(path: str, where: str) -> None:
    """Refuse a module path a LoRDBA file cannot hold (see :func:`lordba.format.header.check_module_path`),
    before any work; raises :class:`ConversionError` naming the module."""
    try:
        check_module_path(path, where)
    except LoRDBAError as err:
        raise ConversionError(f"{err}: lordba could not load the converted adapter") from None


def check_factors(
    path: str, A: torch.Tensor, B: torch.Tensor, names: tuple[str, str], scaling: float, where: str
) -> None:
    """Refuse factors the conversion cannot handle: empty (a zero dimension), or so large that
    ``scaling · B A`` or the solver's float32 arithmetic would overflow (bounded in float64 without
    forming ``B A``). Takes the module path, ``A`` [r, in], ``B`` [out, r], their tensor names, the
    module's scaling and the source; returns nothing; raises :class:`ConversionError`."""
    for t, name in ((A, names[0]), (B, names[1])):
        if t.numel() == 0:
            raise ConversionError(f"{where}: tensor {name} has shape {tuple(t.shape)}: a LoRA factor cannot be empty")
    peak_a, peak_b = float(A.abs().max().double()), float(B.abs().max().double())
    bound = scaling * A.shape[0] * peak_a * peak_b
    if not max(peak_a, peak_b, bound) <= MAX_MAGNITUDE:
        raise ConversionError(
            f"{where}: module {path!r}: |ΔW| could reach {bound:.3g} (scaling {scaling:.3g} from lora_alpha / "
            f"alpha_pattern, max |{names[0]}| {peak_a:.3g}, max |{names[1]}| {peak_b:.3g}), beyond the "
            f"{MAX_MAGNITUDE:.3g} the conversion's float32 arithmetic can hold"
        )


def _positive_number(value: Any) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float
        return False
