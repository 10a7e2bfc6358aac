"""Mutators of the safetensors header: entries (dtype, shape, byte ranges), tensors missing,
extra or renamed, metadata and module dims, declared sizes, and raw edits of the header JSON."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from lordba.config import WEIGHTS_NAME
from lordba_lab.fuzz.corpus import Case
from lordba_lab.fuzz.mutate_base import (
    DTYPES,
    INTS,
    ITEMSIZE,
    ODD_VALUES,
    Entry,
    Mutator,
    data_offsets,
    declared_header_length,
    join_weights,
    module_dims_of,
    raw_json_edit,
    registry,
    set_module_dims,
    tensor_entries,
    with_weights,
)

MUTATORS: dict[str, Mutator] = {}
mutator = registry(MUTATORS)


def _set_entry_field(
    rng: random.Random,
    case: Case,
    field: str,
    value: Callable[[dict[str, Any], list[Entry]], Any],
    in_data: bool = False,
) -> Case:
    """Set ``field`` of a random header entry (one whose byte range lies in the data if
    ``in_data``) to ``value(entry, entries whose byte range lies in the data)``."""

    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        ranged = tensor_entries(h, d)
        names = (
            [e[0] for e in ranged]
            if in_data
            else [k for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)]
        )
        if not names:
            return None
        name = rng.choice(names)
        return {**h, name: {**h[name], field: value(h[name], ranged)}}, d

    return with_weights(case, fn)


@mutator
def tensor_dtype(rng: random.Random, case: Case) -> Case:
    return _set_entry_field(rng, case, "dtype", lambda entry, ents: rng.choice(DTYPES))


@mutator
def tensor_shape(rng: random.Random, case: Case) -> Case:
    def odd_shape(entry: dict[str, Any], ents: list[Entry]) -> Any:
        shape = entry.get("shape")
        shape = list(shape) if isinstance(shape, list) and shape else [0]
        return rng.choice(
            (
                lambda: (
                    [shape[0] + rng.choice([-1, 1]), *shape[1:]]
                    if isinstance(shape[0], int)
                    else rng.choice(ODD_VALUES)
                ),
                lambda: [*shape, 1],
                lambda: [],
                lambda: [float(s) if isinstance(s, int) else s for s in shape],
                lambda: [rng.choice(INTS)],
                lambda: rng.choice(ODD_VALUES),
            )
        )()

    return _set_entry_field(rng, case, "shape", odd_shape)


@mutator
def tensor_offsets(rng: random.Random, case: Case) -> Case:
    def odd_offsets(entry: dict[str, Any], ents: list[Entry]) -> Any:
        start, stop = entry["data_offsets"]
        return rng.choice(
            (
                lambda: [start + rng.choice([-1, 1]), stop + rng.choice([-1, 0, 1])],
                lambda: list(rng.choice(ents)[2:]),  # alias another tensor's bytes
                lambda: [stop, start],
                lambda: [rng.choice(INTS), rng.choice(INTS)],
                lambda: rng.choice(ODD_VALUES),
            )
        )()

    return _set_entry_field(rng, case, "data_offsets", odd_offsets, in_data=True)


@mutator
def swap_tensor_data(rng: random.Random, case: Case) -> Case:
    """Exchange the byte ranges of two tensors (valid when both have the same dtype and size)."""

    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        ents = tensor_entries(h, d)
        if len(ents) < 2:
            return None
        (a, _, a0, a1), (b, _, b0, b1) = rng.sample(ents, 2)
        return {**h, a: {**h[a], "data_offsets": [b0, b1]}, b: {**h[b], "data_offsets": [a0, a1]}}, d

    return with_weights(case, fn)


@mutator
def drop_tensor(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        ents = tensor_entries(h, d)
        if not ents:
            return None
        name, _, start, stop = rng.choice(ents)
        out = {k: v for k, v in h.items() if k != name}
        if rng.random() < 0.5:  # also remove its bytes and shift the others (a cleanly missing tensor)
            d = d[:start] + d[stop:]
            for k, _, s0, s1 in ents:
                if k != name and s0 >= stop:  # (a zero-size tensor starts at its own stop)
                    out[k] = {**out[k], "data_offsets": [s0 - (stop - start), s1 - (stop - start)]}
        return out, d

    return with_weights(case, fn)


@mutator
def add_tensor(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        mods = module_dims_of(h) or {"model.x": None}
        base = rng.choice([*mods, "model.extra", ""])
        kind = rng.choice(["sign_A", "scale_in", "lora_A", "weight", "sign_A.sign_A"])
        n = rng.randint(1, 8)
        return {**h, f"{base}.{kind}": {"dtype": "U8", "shape": [n], "data_offsets": [len(d), len(d) + n]}}, d + bytes(
            n
        )

    return with_weights(case, fn)


@mutator
def rename_tensor(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        names = [k for k in h if k != "__metadata__"]
        if not names:
            return None
        k = rng.choice(names)
        new = rng.choice([k + "x", k.upper(), k.replace(".", "/"), "", k + "\n", k.replace("sign_A", "sign_B")])
        return {(new if n == k else n): v for n, v in h.items()}, d

    return with_weights(case, fn)


@mutator
def metadata_field(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        meta = h.get("__metadata__")
        if not isinstance(meta, dict):
            return None
        key = rng.choice(["format", "format_version", "scale_dtype", "modules", "extra"])
        value = rng.choice(["lordba", "pt", "1", "2", "0", "01", "float16", "int8", "bfloat16", "", 1, None, "{}"])
        meta = dict(meta)
        if rng.random() < 0.2:
            meta.pop(key, None)
        else:
            meta[key] = value
        out = {**h, "__metadata__": meta} if rng.random() < 0.9 else {k: v for k, v in h.items() if k != "__metadata__"}
        return out, d

    return with_weights(case, fn)


def _with_module(
    rng: random.Random,
    case: Case,
    fn: Callable[[dict[str, Any], bytes, dict[str, Any], str], tuple[dict[str, Any], bytes] | None],
) -> Case:
    """Apply ``fn(header, data, the metadata's modules map, a random module's path)`` to the
    weights (unchanged if the metadata lists no modules, or ``fn`` returns ``None``)."""

    def edit(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        mods = module_dims_of(h)
        return fn(h, d, mods, rng.choice(list(mods))) if mods else None

    return with_weights(case, edit)


@mutator
def module_dims(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes, mods: dict[str, Any], name: str) -> tuple[dict[str, Any], bytes] | None:
        dims = mods[name]
        choice = rng.randrange(5)
        if choice == 0 and isinstance(dims, list) and len(dims) == 3:
            i = rng.randrange(3)
            dims = [*dims]
            dims[i] = dims[i] + rng.choice([-1, 1]) if isinstance(dims[i], int) else 1
        elif choice == 1:
            dims = rng.choice(
                [[1, 1], [1, 1, 1, 1], [0, 1, 1], [-1, 8, 2], [1.0, 8, 2], ["8", 8, 2], None, {}, [True, 8, 2]]
            )
        elif choice == 2:
            mods = {k: v for k, v in mods.items() if k != name}
            return (set_module_dims(h, mods) if mods else h), d
        elif choice == 3:
            mods = {**mods, rng.choice(["model.new", name + "x", "", "a..b", "x.base_layer", "a" * 300]): dims}
            return set_module_dims(h, mods), d
        else:
            dims = [rng.choice(INTS), rng.choice(INTS), rng.choice([1, 2, 3, 2**31 - 1])]
        return set_module_dims(h, {**mods, name: dims}), d

    return _with_module(rng, case, fn)


@mutator
def huge_declared_sizes(rng: random.Random, case: Case) -> Case:
    """A module declaring huge dims, with shapes and byte ranges consistent with them: only the
    file length (and the config's rank) can tell; nothing may be allocated for the claim."""

    def fn(h: dict[str, Any], d: bytes, mods: dict[str, Any], name: str) -> tuple[dict[str, Any], bytes] | None:
        dims = mods[name]
        if not (isinstance(dims, list) and len(dims) == 3 and all(type(v) is int and v > 0 for v in dims)):
            return None
        in_f, out_f, r = rng.choice([2**30, 2**31 - 1, 10**6]), rng.choice([2**30, 2**20]), dims[2]
        ents = {k: v for k, v in h.items() if not k.startswith(name + ".")}
        sizes = {"sign_A": (r * in_f + 7) // 8, "sign_B": (out_f * r + 7) // 8}
        for kind in ("scale_in", "scale_mid", "scale_out"):
            e = h.get(f"{name}.{kind}")
            item = ITEMSIZE.get(str(e.get("dtype")), 2) if isinstance(e, dict) else 2
            sizes[kind] = {"scale_in": in_f, "scale_mid": r, "scale_out": out_f}[kind] * item
        offset = max((off[1] for k, e in ents.items() if k != "__metadata__" and (off := data_offsets(e))), default=0)
        for kind, n in sizes.items():
            old = h.get(f"{name}.{kind}")
            dtype = old.get("dtype", "U8") if isinstance(old, dict) else "U8"
            shape = [n] if kind.startswith("sign") else [n // ITEMSIZE.get(str(dtype), 1)]
            ents[f"{name}.{kind}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        return set_module_dims(ents, {**mods, name: [in_f, out_f, r]}), d

    return _with_module(rng, case, fn)


@mutator
def header_text(rng: random.Random, case: Case) -> Case:
    """Raw edits of the header JSON: duplicate keys, deep nesting, odd numbers, bad UTF-8, escapes."""
    data = case.get(WEIGHTS_NAME, b"")
    n = declared_header_length(data)
    if n is None or n > len(data) - 8:
        return case
    raw, rest = data[8 : 8 + n].rstrip(b" "), data[8 + n :]
    return {**case, WEIGHTS_NAME: join_weights(raw_json_edit(rng, raw), rest)}
