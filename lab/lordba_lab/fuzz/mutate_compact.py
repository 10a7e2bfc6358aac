"""Mutators aimed at format version 3 (the compact file): the folded module list (ranges widened,
emptied, split, unfolded, doubled, huge), int4 nibbles (the invalid index -8, padding nibbles) and
bytes moved across the modules' slices of one kind tensor."""

from __future__ import annotations

import random
import re
from typing import Any

from lordba_lab.fuzz.corpus import Case
from lordba_lab.fuzz.mutate_base import Mutator, module_dims_of, registry, set_module_dims, tensor_entries, with_weights

MUTATORS: dict[str, Mutator] = {}
mutator = registry(MUTATORS)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@mutator
def folded_ranges(rng: random.Random, case: Case) -> Case:
    """Edit a ``{a..b}`` key of the folded module list: wider, narrower, empty, a single index,
    reversed, huge, split into two keys, unfolded, or given a second range."""

    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        mods = module_dims_of(h)
        keys = [k for k in mods or {} if _RANGE.search(k)]
        if not keys:
            return None
        key = rng.choice(keys)
        value = mods[key]
        found = _RANGE.search(key)
        a, b = int(found.group(1)), int(found.group(2))
        head, tail = key[: found.start()], key[found.end() :]
        rest = {k: v for k, v in mods.items() if k != key}
        choice = rng.randrange(8)
        if choice < 4:
            lo, hi = [(a, b + 1), (a, b - 1), (a, a), (b, a)][choice]
            new = {f"{head}{{{lo}..{hi}}}{tail}": value}
        elif choice == 4:
            new = {f"{head}{{{a}..{rng.choice([2**32, 10**9, 2**31 - 1])}}}{tail}": value}
        elif choice == 5:
            new = {f"{head}{{{a}..{a + 1}}}{tail}": value, f"{head}{{{a + 2}..{b}}}{tail}": value}
        elif choice == 6:
            new = {f"{head}{i}{tail}": value for i in range(a, min(b, a + 64) + 1)}
        else:
            new = {f"{head}{{{a}..{b}}}.{{0..1}}{tail}": value}
        return set_module_dims(h, {**rest, **new}), d

    return with_weights(case, fn)


@mutator
def int4_nibbles(rng: random.Random, case: Case) -> Case:
    """In a uint8 scale tensor (int4 codes): write the invalid index -8, set a padding nibble, or
    change a nibble to another valid index (a different, valid adapter unless a peak is lost)."""

    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        ents = [e for e in tensor_entries(h, d) if e[0] in ("scale_in", "scale_out") and e[1] == "U8" and e[3] > e[2]]
        if not ents:
            return None
        _, _, start, stop = rng.choice(ents)
        i = rng.randrange(start, stop)
        nibble = rng.choice([8, rng.randrange(16)])
        byte = d[i] & 0x0F | nibble << 4 if rng.random() < 0.5 else d[i] & 0xF0 | nibble
        if rng.random() < 0.3:  # the last byte's low nibble: padding after an odd length
            i, byte = stop - 1, d[stop - 1] | rng.randrange(1, 16)
        return h, d[:i] + bytes([byte]) + d[i + 1 :]

    return with_weights(case, fn)


@mutator
def kind_slices(rng: random.Random, case: Case) -> Case:
    """Rotate a kind tensor's bytes by a few positions: every module's slice shifts into its neighbour's."""

    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        ents = [e for e in tensor_entries(h, d) if "." not in e[0] and e[3] - e[2] > 1]
        if not ents:
            return None
        _, _, start, stop = rng.choice(ents)
        k = rng.randrange(1, stop - start)
        chunk = d[start:stop]
        return h, d[:start] + chunk[k:] + chunk[:k] + d[stop:]

    return with_weights(case, fn)
