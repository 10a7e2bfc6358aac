"""Strict, bounded JSON from untrusted files, short reprs of untrusted values for messages, and non-finite floats
in strict JSON."""

from __future__ import annotations

import json
import math
import re
import reprlib
from pathlib import Path
from typing import Any

from lordba._util.files import open_untrusted
from lordba.errors import AdapterFormatError


def read_json_file(path: Path, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """A size-limited JSON object from ``path`` (a regular file of its directory, see
    :func:`lordba._util.files.open_untrusted`); :class:`AdapterFormatError` naming the file otherwise."""
    try:
        with open_untrusted(path, "missing (not an adapter directory)") as f:
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
    keep the first or the last duplicate would see different files), no string holding a lone UTF-16
    surrogate escape (``"\\ud800"``: not Unicode text, it cannot even be printed), and every failure,
    including nesting too deep and integers too long to convert, as :class:`AdapterFormatError`
    naming ``what``."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise AdapterFormatError(f"{what}: not valid JSON ({err})") from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(data):
        raise AdapterFormatError(f"{what}: not valid JSON (a string holds a lone UTF-16 surrogate, not Unicode text)")
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def unencodable_at(text: str) -> int | None:
    """The index of ``text``'s first character that is not Unicode text (a lone UTF-16 surrogate: from JSON's
    ``"\\ud800"``, or bytes that are not UTF-8 read with ``surrogateescape``), ``None`` if there is none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _has_lone_surrogate(data: Any) -> bool:
    """Whether a parsed JSON value holds a string (key or value) that is not encodable as UTF-8."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and unencodable_at(item) is not None:
            return True
    return False


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


FLOAT_TAG = "$float"  # a non-finite float in strict JSON (which has no NaN / Infinity): {"$float": "nan"}


def encode_nonfinite(value: Any) -> Any:
    """``value`` (JSON-able) with each NaN / ±inf float as ``{"$float": repr}``: a training checkpoint's log may hold an
    evaluation's NaN, and the strict reader refuses a bare ``NaN`` (every checkpoint would read as damaged)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {FLOAT_TAG: repr(value)}
    if isinstance(value, dict):
        return {k: encode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_nonfinite(v) for v in value]
    return value


def decode_nonfinite(value: Any) -> Any:
    """The inverse of :func:`encode_nonfinite`."""
    if isinstance(value, dict):
        if set(value) == {FLOAT_TAG} and value[FLOAT_TAG] in ("nan", "inf", "-inf"):
            return float(value[FLOAT_TAG])
        return {k: decode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_nonfinite(v) for v in value]
    return value
