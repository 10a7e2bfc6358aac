"""Strict, bounded JSON from untrusted files, and short reprs of untrusted values for messages."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

from lordba.errors import AdapterFormatError


def read_json_file(path: Path, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """A size-limited JSON object from ``path``; :class:`AdapterFormatError` naming the file otherwise."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing (not an adapter directory)")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)  # bounded even if the file grows after a stat
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot read ({err.strerror})") from None
    if len(raw) > max_bytes:
        raise AdapterFormatError(f"{path}: larger than the {max_bytes}-byte limit for a config")
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def parse_json(raw: bytes, what: str) -> Any:
    """Strict JSON from untrusted bytes: UTF-8, no NaN/Infinity, no duplicate keys (readers that
    keep the first or the last duplicate would see different files), and every failure, including
    nesting too deep and integers too long to convert, as :class:`AdapterFormatError` naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise AdapterFormatError(f"{what}: not valid JSON ({err})") from None


def _reject_constant(name: str) -> None:
    raise json.JSONDecodeError(f"non-standard constant {name}", name, 0)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return data


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def safe_repr(value: Any) -> str:
    """A short ``repr`` of an untrusted value for an error message: bounded length and depth,
    and no failure on huge integers (whose ``repr`` raises) or deep nesting."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"
