"""The field checks of :class:`~lordba.config.LoRDBAConfig` (:mod:`lordba.config`): ranks, positive numbers,
strings, choices, module lists and patterns, layer indices and layer-list names, the base-quantization record.
Each raises :class:`~lordba.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lordba._util.jsonio import safe_repr
from lordba._util.patterns import check_pattern
from lordba.errors import ConfigError

MAX_RANK = (1 << 31) - 1
_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


def _check_rank(name: str, value: Any) -> None:
    if type(value) is not int or not 1 <= value <= MAX_RANK:
        raise ConfigError(f"{name} must be a positive integer below 2**31, got {safe_repr(value)}")


def _check_positive(name: str, value: Any) -> None:
    try:
        ok = type(value) in (int, float) and math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be a positive finite number, got {safe_repr(value)}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {type(value).__name__}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices or not isinstance(value, str):
        raise ConfigError(f"{name} must be one of {choices}, got {safe_repr(value)}")


def _check_modules(name: str, value: Any) -> list[str] | str | None:
    if value is None or value == "all-linear":
        return value
    if isinstance(value, str):
        check_pattern(name, value)
        return value
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else list(value)
        for item in items:
            _check_str(f"{name} entry", item)
        if not items:
            raise ConfigError(f"{name} must not be empty")
        return items
    raise ConfigError(f"{name} must be a list of strings, a string or null, got {type(value).__name__}")


def _check_layers(value: Any) -> list[int] | int | None:
    if value is None:
        return None
    items = [value] if type(value) is int else value
    if not isinstance(items, (list, tuple)) or not items or any(type(i) is not int or i < 0 for i in items):
        raise ConfigError(
            f"layers_to_transform must be a non-negative int or a non-empty list of them, got {safe_repr(value)}"
        )
    return value if type(value) is int else list(items)


def _check_layers_pattern(value: Any) -> list[str] | str | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, (list, tuple))
        or not items
        or not all(isinstance(i, str) and _NAME_RE.fullmatch(i) for i in items)
    ):
        raise ConfigError(
            f"layers_pattern must be a name (letters, digits, '_') or a list of names, got {safe_repr(value)}"
        )
    return value if isinstance(value, str) else list(items)


def check_base_quantization(value: Any) -> dict[str, Any] | None:
    """Validate a ``base_quantization`` record: null, or ``{"backend": str, "bits": number > 0,
    "group_size": int > 0 or null}``; returns it (a fresh dict). Raises :class:`ConfigError`."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"backend", "bits", "group_size"}:
        raise ConfigError(
            f"base_quantization must be null or an object with keys backend, bits, group_size, got {safe_repr(value)}"
        )
    backend, bits, group = value["backend"], value["bits"], value["group_size"]
    if not isinstance(backend, str) or not _NAME_RE.fullmatch(backend.replace("-", "_")):
        raise ConfigError(f"base_quantization.backend must be a backend name, got {safe_repr(backend)}")
    _check_positive("base_quantization.bits", bits)
    if group is not None and (type(group) is not int or group < 1):
        raise ConfigError(f"base_quantization.group_size must be a positive int or null, got {safe_repr(group)}")
    return {"backend": backend, "bits": bits, "group_size": group}
