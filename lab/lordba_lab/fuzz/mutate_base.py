"""What the mutators share: odd values, the safetensors container and config helpers, raw JSON
edits, and :func:`registry` (each mutator module keeps its own ``MUTATORS``).

Imports go one way: :mod:`.mutate_bytes`, :mod:`.mutate_header` and :mod:`.mutate_content`
import this module, and :mod:`.mutate` imports them all to assemble ``MUTATORS`` and
:func:`~lordba_lab.fuzz.mutate.mutate`.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

from lordba.config import CONFIG_NAME, WEIGHTS_NAME
from lordba_lab.fuzz.corpus import FILE_NAMES, Case

Mutator = Callable[[random.Random, Case], Case]
Entry = tuple[str, str, int, int]  # a header entry whose byte range lies in the data: name, dtype, start, stop

INTS = (0, -1, 1, 2, 7, 8, 9, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, -(2**63), 10**30)
ODD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 0.5, -0.0, 1e308, 2**31, 2**64, "", "x", "1", "float16", "int8",
    [], [1], ["q_proj"], {}, {"a": 1}, [[["deep"]]], "all-linear", "(", "(a+)+$", ".*", "q_proj",
)  # fmt: skip
RAW_NUMBERS = (b"1e400", b"-1e400", b"NaN", b"Infinity", b"1" + b"0" * 5000, b"-0", b"1.0e-400", b"0x10")
DTYPES = ("U8", "I8", "F16", "BF16", "F32", "F64", "I64", "BOOL", "F8_E4M3", "u8", "", 8)
FLOAT_BITS = {  # little-endian NaN and +inf of each float dtype
    "F32": (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"),
    "F16": (b"\x00\x7e", b"\x00\x7c"),
    "BF16": (b"\xc0\x7f", b"\x80\x7f"),
}
ITEMSIZE = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}


def registry(mutators: dict[str, Mutator]) -> Callable[[Mutator], Mutator]:
    """A decorator that records a mutator in ``mutators`` under its function name."""

    def mutator(fn: Mutator) -> Mutator:
        mutators[fn.__name__] = fn
        return fn

    return mutator


# ----------------------------------------------------------------------------- container helpers
def declared_header_length(data: bytes) -> int | None:
    """The header length safetensors bytes declare (their first 8 bytes), or ``None`` if shorter."""
    return struct.unpack_from("<Q", data)[0] if len(data) >= 8 else None


def split_weights(data: bytes) -> tuple[dict[str, Any] | None, bytes]:
    """``(parsed header or None, data section)`` of safetensors bytes, tolerant of damage."""
    n = declared_header_length(data)
    if n is None:
        return None, b""
    if n > len(data) - 8:
        return None, data[8:]
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return None, data[8 + n :]
    return (header if isinstance(header, dict) else None), data[8 + n :]


def join_weights(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    """Safetensors bytes from a header (a dict, or raw JSON bytes) and a data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def data_offsets(entry: Any) -> tuple[int, int] | None:
    """The ``data_offsets`` of a header entry if they are a pair of ints, else ``None``."""
    off = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off):
        return off[0], off[1]
    return None


def tensor_entries(header: dict[str, Any], data: bytes) -> list[Entry]:
    """``(name, dtype, start, stop)`` of header entries whose byte range lies in ``data``."""
    out = []
    for name, e in header.items():
        off = data_offsets(e) if name != "__metadata__" else None
        if off is not None and 0 <= off[0] <= off[1] <= len(data):
            out.append((name, str(e.get("dtype")), *off))
    return sorted(out)


def with_weights(
    case: Case, fn: Callable[[dict[str, Any], bytes], tuple[dict[str, Any] | bytes, bytes] | None]
) -> Case:
    """Apply ``fn(header, data)`` to the weights of ``case`` (unchanged if they do not parse or
    ``fn`` returns ``None``)."""
    header, data = split_weights(case.get(WEIGHTS_NAME, b""))
    if header is None:
        return case
    result = fn(header, data)
    if result is None:
        return case
    return {**case, WEIGHTS_NAME: join_weights(*result)}


def with_config(case: Case, fn: Callable[[dict[str, Any]], dict[str, Any] | bytes | None]) -> Case:
    """Apply ``fn(config)`` to the config of ``case`` (unchanged if it is not a JSON object or
    ``fn`` returns ``None``); ``fn`` returns a dict or raw bytes."""
    try:
        config = json.loads(case.get(CONFIG_NAME, b""))
    except (ValueError, RecursionError):
        return case
    if not isinstance(config, dict):
        return case
    result = fn(config)
    if result is None:
        return case
    raw = result if isinstance(result, bytes) else json.dumps(result, indent=2).encode()
    return {**case, CONFIG_NAME: raw}


def module_dims_of(header: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata's ``modules`` map (path -> dims), or ``None`` if absent or damaged."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), str):
        return None
    try:
        mods = json.loads(meta["modules"])
    except (ValueError, RecursionError):
        return None
    return mods if isinstance(mods, dict) and mods else None


def set_module_dims(header: dict[str, Any], mods: dict[str, Any]) -> dict[str, Any]:
    """``header`` with its metadata's ``modules`` map replaced by ``mods``."""
    meta = dict(header["__metadata__"])
    meta["modules"] = json.dumps(mods, separators=(",", ":"), sort_keys=True)
    return {**header, "__metadata__": meta}


def pick_file(rng: random.Random, case: Case) -> str | None:
    """A random file name of ``case`` (``None`` for an empty directory)."""
    names = [n for n in FILE_NAMES if n in case]
    return rng.choice(names) if names else None


# ----------------------------------------------------------------------------- raw JSON (config and header)
def raw_json_edit(rng: random.Random, raw: bytes) -> bytes:
    """A raw edit of JSON text: duplicate keys, deep nesting, odd numbers, bad UTF-8, escapes,
    a BOM, not an object, reordered members, trailing junk."""
    choice = rng.randrange(9)
    if choice == 0 and raw.startswith(b"{") and len(raw) > 2:  # duplicate the first member at the end
        try:
            first_key = next(iter(json.loads(raw)))
        except (ValueError, RecursionError, StopIteration, TypeError):
            return raw
        value = json.dumps(json.loads(raw)[first_key], separators=(",", ":")).encode()
        return raw[:-1] + b"," + json.dumps(first_key).encode() + b":" + value + b"}"
    if choice == 1:  # deep nesting
        depth = rng.choice([50, 900, 5000, 200000])
        return b'{"__deep__":' + b"[" * depth + b"]" * depth + b"," + raw[1:]
    if choice == 2:  # replace a number with an odd one
        digits = [i for i, c in enumerate(raw) if 48 <= c <= 57]
        if not digits:
            return raw
        i = rng.choice(digits)
        j = i
        while j < len(raw) and 48 <= raw[j] <= 57:
            j += 1
        return raw[:i] + rng.choice(RAW_NUMBERS) + raw[j:]
    if choice == 3:  # invalid UTF-8
        i = rng.randrange(len(raw) + 1)
        return raw[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + raw[i:]
    if choice == 4:  # string escapes: lone surrogates, control characters, NUL
        i = raw.find(b'"', rng.randrange(len(raw) + 1))
        if i < 0:
            return raw
        return raw[: i + 1] + rng.choice([b"\\ud800", b"\\u0000", b"\\n", b"\\u001b[31m", b"\\uffff"]) + raw[i + 1 :]
    if choice == 5:  # whitespace and a BOM
        return rng.choice([b"\xef\xbb\xbf", b" ", b"\n\t "]) + raw
    if choice == 6:  # not an object
        return rng.choice([b"[]", b"null", b"1", b'"x"', b"", b"{", raw[: len(raw) // 2]])
    if choice == 7:  # reorder members (a different but valid layout of the same header)
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return raw
        if not isinstance(obj, dict):
            return raw
        items = list(obj.items())
        rng.shuffle(items)
        return json.dumps(dict(items), indent=rng.choice([None, 1])).encode()
    return raw + rng.choice([b"x", b"}", b",", b"\x00"])
