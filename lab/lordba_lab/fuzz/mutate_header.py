"""Mutators of the safetensors header: entries (dtype, shape, byte ranges), tensors missing,
extra or renamed, metadata and module dims, declared sizes, and raw edits of the header JSON."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

from lordba.config import WEIGHTS_NAME
from lordba_lab.fuzz.corpus import Case
from lordba_lab.fuzz.mutate import (
    DTYPES,
    INTS,
    ITEMSIZE,
    ODD_VALUES,
    RAW_NUMBERS,
    join_weights,
    module_dims_of,
    mutator,
    set_module_dims,
    tensor_entries,
    with_weights,
)


@mutator
def tensor_dtype(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        names = [k for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)]
        if not names:
            return None
        k = rng.choice(names)
        return {**h, k: {**h[k], "dtype": rng.choice(DTYPES)}}, d

    return with_weights(case, fn)


@mutator
def tensor_shape(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        names = [k for k, v in h.items() if k != "__metadata__" and isinstance(v, dict)]
        if not names:
            return None
        k = rng.choice(names)
        shape = h[k].get("shape")
        shape = list(shape) if isinstance(shape, list) and shape else [0]
        choice = rng.randrange(6)
        if choice == 0 and isinstance(shape[0], int):
            shape[0] += rng.choice([-1, 1])
        elif choice == 1:
            shape = [*shape, 1]
        elif choice == 2:
            shape = []
        elif choice == 3:
            shape = [float(s) if isinstance(s, int) else s for s in shape]
        elif choice == 4:
            shape = [rng.choice(INTS)]
        else:
            shape = rng.choice(ODD_VALUES)
        return {**h, k: {**h[k], "shape": shape}}, d

    return with_weights(case, fn)


@mutator
def tensor_offsets(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        ents = tensor_entries(h, d)
        if not ents:
            return None
        name, _, start, stop = rng.choice(ents)
        choice = rng.randrange(5)
        if choice == 0:
            off: Any = [start + rng.choice([-1, 1]), stop + rng.choice([-1, 0, 1])]
        elif choice == 1:
            other = rng.choice(ents)
            off = [other[2], other[3]]  # alias another tensor's bytes
        elif choice == 2:
            off = [stop, start]
        elif choice == 3:
            off = [rng.choice(INTS), rng.choice(INTS)]
        else:
            off = rng.choice(ODD_VALUES)
        return {**h, name: {**h[name], "data_offsets": off}}, d

    return with_weights(case, fn)


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


@mutator
def module_dims(rng: random.Random, case: Case) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        mods = module_dims_of(h)
        if not mods:
            return None
        name = rng.choice(list(mods))
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

    return with_weights(case, fn)


@mutator
def huge_declared_sizes(rng: random.Random, case: Case) -> Case:
    """A module declaring huge dims, with shapes and byte ranges consistent with them: only the
    file length (and the config's rank) can tell; nothing may be allocated for the claim."""

    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        mods = module_dims_of(h)
        if not mods:
            return None
        name = rng.choice(list(mods))
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
        offset = max((e["data_offsets"][1] for _, e in _valid_entries(ents)), default=0)
        for kind, n in sizes.items():
            old = h.get(f"{name}.{kind}")
            dtype = old.get("dtype", "U8") if isinstance(old, dict) else "U8"
            shape = [n] if kind.startswith("sign") else [n // ITEMSIZE.get(str(dtype), 1)]
            ents[f"{name}.{kind}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        return set_module_dims(ents, {**mods, name: [in_f, out_f, r]}), d

    return with_weights(case, fn)


def _valid_entries(h: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (k, v)
        for k, v in h.items()
        if k != "__metadata__"
        and isinstance(v, dict)
        and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2
        and all(type(o) is int for o in v["data_offsets"])
    ]


@mutator
def header_text(rng: random.Random, case: Case) -> Case:
    """Raw edits of the header JSON: duplicate keys, deep nesting, odd numbers, bad UTF-8, escapes."""
    data = case.get(WEIGHTS_NAME, b"")
    if len(data) < 8:
        return case
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        return case
    raw, rest = data[8 : 8 + n].rstrip(b" "), data[8 + n :]
    raw = raw_json_edit(rng, raw)
    return {**case, WEIGHTS_NAME: join_weights(raw, rest)}


def raw_json_edit(rng: random.Random, raw: bytes) -> bytes:
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
