"""Structure-aware mutations of adapter directories (fuzz cases).

Each mutator takes a random generator and a case and returns a new case. They know the format:
the config's fields, the safetensors container (length, JSON header, data), the metadata and the
tensors' byte ranges, so that most mutations get past the outer checks and reach the inner ones
(the engines fix the checksum up afterwards for most cases, see :func:`mutate`). Byte-level
mutations (bit flips, truncation, splices) cover what the structured ones do not think of.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

from lordba.config import CONFIG_NAME, WEIGHTS_NAME
from lordba_lab.fuzz.corpus import FILE_NAMES, Case, fix_checksum

Mutator = Callable[[random.Random, Case], Case]
MUTATORS: dict[str, Mutator] = {}

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


def mutator(fn: Mutator) -> Mutator:
    MUTATORS[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- container helpers
def split_weights(data: bytes) -> tuple[dict[str, Any] | None, bytes]:
    """``(parsed header or None, data section)`` of safetensors bytes, tolerant of damage."""
    if len(data) < 8:
        return None, b""
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        return None, data[8:]
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return None, data[8 + n :]
    return (header if isinstance(header, dict) else None), data[8 + n :]


def join_weights(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensor_entries(header: dict[str, Any], data: bytes) -> list[tuple[str, str, int, int]]:
    """``(name, dtype, start, stop)`` of header entries whose byte range lies in ``data``."""
    out = []
    for name, e in header.items():
        if name == "__metadata__" or not isinstance(e, dict):
            continue
        off = e.get("data_offsets")
        if (
            isinstance(off, list)
            and len(off) == 2
            and all(type(o) is int for o in off)
            and 0 <= off[0] <= off[1] <= len(data)
        ):
            out.append((name, str(e.get("dtype")), off[0], off[1]))
    return sorted(out)


def with_weights(
    case: Case, fn: Callable[[dict[str, Any], bytes], tuple[dict[str, Any] | bytes, bytes] | None]
) -> Case:
    header, data = split_weights(case.get(WEIGHTS_NAME, b""))
    if header is None:
        return case
    result = fn(header, data)
    if result is None:
        return case
    return {**case, WEIGHTS_NAME: join_weights(*result)}


def with_config(case: Case, fn: Callable[[dict[str, Any]], dict[str, Any] | bytes | None]) -> Case:
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
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), str):
        return None
    try:
        mods = json.loads(meta["modules"])
    except (ValueError, RecursionError):
        return None
    return mods if isinstance(mods, dict) and mods else None


def set_module_dims(header: dict[str, Any], mods: dict[str, Any]) -> dict[str, Any]:
    meta = dict(header["__metadata__"])
    meta["modules"] = json.dumps(mods, separators=(",", ":"), sort_keys=True)
    return {**header, "__metadata__": meta}


def pick_file(rng: random.Random, case: Case) -> str | None:
    names = [n for n in FILE_NAMES if n in case]
    return rng.choice(names) if names else None


# ----------------------------------------------------------------------------- byte level
@mutator
def flip_bit(rng: random.Random, case: Case) -> Case:
    name = pick_file(rng, case)
    if not name or not case[name]:
        return case
    data = bytearray(case[name])
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    return {**case, name: bytes(data)}


@mutator
def set_bytes(rng: random.Random, case: Case) -> Case:
    name = pick_file(rng, case)
    if not name or not case[name]:
        return case
    data = bytearray(case[name])
    i = rng.randrange(len(data))
    fill = rng.choice([b"\x00", b"\xff", b"\x80", b"\x7f", bytes([rng.randrange(256)])])
    data[i : i + rng.randint(1, 8)] = fill * rng.randint(1, 8)
    return {**case, name: bytes(data)}


@mutator
def truncate(rng: random.Random, case: Case) -> Case:
    name = pick_file(rng, case)
    if not name:
        return case
    n = len(case[name])
    cut = rng.choice([0, 1, 7, 8, 9, n // 2, max(n - 1, 0), max(n - 8, 0), rng.randint(0, n)])
    return {**case, name: case[name][:cut]}


@mutator
def append_bytes(rng: random.Random, case: Case) -> Case:
    name = pick_file(rng, case)
    if not name:
        return case
    tail = rng.choice([b"\x00", b" " * 8, b"\x00" * rng.randint(1, 64), bytes(rng.randrange(256) for _ in range(9))])
    return {**case, name: case[name] + tail}


@mutator
def splice(rng: random.Random, case: Case) -> Case:
    """Copy a range of one file over another range (possibly of another file)."""
    src, dst = pick_file(rng, case), pick_file(rng, case)
    if not src or not dst or not case[src] or not case[dst]:
        return case
    a = rng.randrange(len(case[src]))
    chunk = case[src][a : a + rng.randint(1, 64)]
    b = rng.randrange(len(case[dst]))
    data = case[dst]
    return {**case, dst: data[:b] + chunk + data[b + (len(chunk) if rng.random() < 0.5 else 0) :]}


@mutator
def remove_file(rng: random.Random, case: Case) -> Case:
    name = pick_file(rng, case)
    return {k: v for k, v in case.items() if k != name}


@mutator
def header_length(rng: random.Random, case: Case) -> Case:
    data = case.get(WEIGHTS_NAME, b"")
    if len(data) < 8:
        return case
    (n,) = struct.unpack_from("<Q", data)
    value = rng.choice(
        [0, 1, n - 1, n + 1, n + 8, len(data) - 8, len(data), 2**63, 2**64 - 1, 64 << 20, (64 << 20) + 1]
    )
    return {**case, WEIGHTS_NAME: struct.pack("<Q", value % 2**64) + data[8:]}


def mutate(rng: random.Random, case: Case, max_ops: int = 4, fix_probability: float = 0.75) -> tuple[Case, list[str]]:
    """Apply 1..``max_ops`` random mutators, then (usually) fix the checksum(s) up."""
    names = []
    for _ in range(rng.randint(1, max_ops)):
        name = rng.choice(list(MUTATORS))
        case = MUTATORS[name](rng, case)
        names.append(name)
    if rng.random() < fix_probability:
        case = fix_checksum(case, backups=rng.random() < 0.5)
        names.append("fix_checksum")
    return case, names


# The other mutators register themselves on import (they use the helpers above).
from lordba_lab.fuzz import mutate_content, mutate_header  # noqa: E402, F401
