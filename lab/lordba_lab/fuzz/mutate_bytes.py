"""Byte-level mutators: bit flips, overwritten bytes, truncation, appended junk, splices, a
removed file and the safetensors header length. They cover what the structured mutators
(:mod:`.mutate_header`, :mod:`.mutate_content`) do not think of."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from lordba.config import WEIGHTS_NAME
from lordba_lab.fuzz.corpus import Case
from lordba_lab.fuzz.mutate_base import Mutator, declared_header_length, pick_file, registry

MUTATORS: dict[str, Mutator] = {}
mutator = registry(MUTATORS)


def _edit_byte(rng: random.Random, case: Case, edit: Callable[[bytearray, int], None]) -> Case:
    """``edit(data, i)`` on a random non-empty file at a random index ``i``."""
    name = pick_file(rng, case)
    if not name or not case[name]:
        return case
    data = bytearray(case[name])
    edit(data, rng.randrange(len(data)))
    return {**case, name: bytes(data)}


@mutator
def flip_bit(rng: random.Random, case: Case) -> Case:
    def edit(data: bytearray, i: int) -> None:
        data[i] ^= 1 << rng.randrange(8)

    return _edit_byte(rng, case, edit)


@mutator
def set_bytes(rng: random.Random, case: Case) -> Case:
    def edit(data: bytearray, i: int) -> None:
        fill = rng.choice([b"\x00", b"\xff", b"\x80", b"\x7f", bytes([rng.randrange(256)])])
        data[i : i + rng.randint(1, 8)] = fill * rng.randint(1, 8)

    return _edit_byte(rng, case, edit)


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
    n = declared_header_length(data)
    if n is None:
        return case
    value = rng.choice(
        [0, 1, n - 1, n + 1, n + 8, len(data) - 8, len(data), 2**63, 2**64 - 1, 64 << 20, (64 << 20) + 1]
    )
    return {**case, WEIGHTS_NAME: struct.pack("<Q", value % 2**64) + data[8:]}
