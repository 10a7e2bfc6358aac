"""The oracle's independent reading of a format version 3 file (docs/format.md, "Version 3"): the
folded module list, the five kind tensors sliced per module in sorted path order, int4 nibbles.
Written apart from :mod:`lordba.format.compact`, from the document."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import torch

KINDS = ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out")
INT4 = (0, 18, 36, 54, 73, 91, 109, 127)
ST = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
FILE_DTYPES = {  # scale_dtype -> (scale_in, scale_mid, scale_out) as stored
    "float32": ("F32",) * 3,
    "float16": ("F16",) * 3,
    "bfloat16": ("BF16",) * 3,
    "int8": ("I8", "F32", "I8"),
    "int4": ("U8", "F32", "U8"),
}
_KEY = re.compile(r"([^{}]*)\{(0|[1-9][0-9]*)\.\.(0|[1-9][0-9]*)\}([^{}]*)")
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")
ValueRule = Callable[[str, str, bytes, int, torch.Tensor], "str | None"]


def unfold(folded: dict[str, Any]) -> dict[str, Any]:
    """The module paths a folded ``modules`` object names (a key holds at most one ``{a..b}``, a < b)."""
    dims: dict[str, Any] = {}
    for key, value in folded.items():
        found = _KEY.fullmatch(key)
        if found is None:
            if "{" in key or "}" in key:
                raise ValueError(f"malformed key {key!r}")
            names = [key]
        else:
            head, first, last, tail = found.group(1), int(found.group(2)), int(found.group(3)), found.group(4)
            if first >= last or last - first > 1 << 20:
                raise ValueError(f"bad range in {key!r}")
            names = [f"{head}{i}{tail}" for i in range(first, last + 1)]
        for name in names:
            if name in dims:
                raise ValueError(f"{name} twice")
            dims[name] = value
    return dims


def fold(dims: dict[str, Any]) -> dict[str, Any]:
    """The canonical folded form: the first all-digit part of a path, maximal runs of equal dims."""
    groups: dict[tuple, list[int]] = {}
    out: dict[str, Any] = {}
    for name, value in dims.items():
        parts = name.split(".")
        where = [i for i, p in enumerate(parts) if _INDEX.fullmatch(p)]
        if not where:
            out[name] = value
            continue
        i = where[0]
        groups.setdefault((tuple(parts[:i]), tuple(parts[i + 1 :]), json.dumps(value)), []).append(int(parts[i]))
    for (head, tail, value), numbers in groups.items():
        numbers = sorted(numbers)
        runs = [[numbers[0], numbers[0]]]
        for n in numbers[1:]:
            if n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        for a, b in runs:
            index = str(a) if a == b else f"{{{a}..{b}}}"
            out[".".join([*head, index, *tail])] = json.loads(value)
    return dict(sorted(out.items()))


def nibble_codes(raw: bytes, n: int) -> tuple[list[int], str | None]:
    """The int4 codes of ``n`` elements stored in ``raw`` and what is wrong with the nibbles, if anything."""
    nibbles = [x for b in raw for x in (b >> 4, b & 15)]
    if 8 in nibbles:
        return [], "a 4-bit index is -8"
    if len(nibbles) > n and any(nibbles[n:]):
        return [], "a padding nibble is not 0"
    index = [v - 16 if v > 8 else v for v in nibbles[:n]]
    return [INT4[abs(k)] * (1 if k >= 0 else -1) for k in index], None


def content_problem(
    adapter: Any, tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str], value_problem: ValueRule
) -> str | None:
    """``None`` if the loaded ``adapter`` is exactly what the version 3 file holds and the file obeys
    the format's rules (read independently), else what is wrong."""
    try:
        folded = json.loads(metadata["modules"])
        dims = unfold(folded)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        return f"loaded although the folded module list is malformed ({err})"
    if fold(dims) != folded or list(folded) != sorted(folded):
        return "loaded although the folded module list is not in its canonical form"
    if set(dims) != set(adapter.modules):
        return f"loaded modules {sorted(adapter.modules)} but the file lists {sorted(dims)}"
    kinds = {k for k in tensors if not k.startswith("extra:")}
    if kinds != set(KINDS):
        return f"loaded although the file's tensors {sorted(kinds)} are not the five kinds"
    scale_dtype = adapter.config.scale_dtype
    offset = dict.fromkeys(KINDS, 0)
    for path in sorted(dims):
        problem = _module_problem(adapter, path, dims[path], tensors, offset, scale_dtype, value_problem)
        if problem:
            return problem
    for kind in KINDS:
        dtype, shape, raw = tensors[kind]
        if shape != [offset[kind] // _size(dtype)] or len(raw) != offset[kind]:
            return f"{kind}: loaded although it holds {len(raw)} bytes, shape {shape}, for {offset[kind]}"
    return None


def _size(dtype: str) -> int:
    return torch.empty(0, dtype=ST[dtype]).element_size()


def _module_problem(
    adapter: Any,
    path: str,
    dims: list[int],
    tensors: dict[str, tuple[str, list[int], bytes]],
    offset: dict[str, int],
    scale_dtype: str,
    value_problem: ValueRule,
) -> str | None:
    rec = adapter.modules[path]
    in_f, out_f, r = dims
    if (rec.in_features, rec.out_features, rec.r) != (in_f, out_f, r) or r != adapter.config.rank_for(path):
        return f"{path}: loaded dims {(rec.in_features, rec.out_features, rec.r)}, file {dims}"
    st_in, st_mid, st_out = FILE_DTYPES[scale_dtype]
    counts = {"sign_A": r * in_f, "sign_B": out_f * r, "scale_in": in_f, "scale_mid": r, "scale_out": out_f}
    stored = {"sign_A": ("U8", (r * in_f + 7) // 8), "sign_B": ("U8", (out_f * r + 7) // 8)}
    for kind, dtype in (("scale_in", st_in), ("scale_mid", st_mid), ("scale_out", st_out)):
        nibbles = scale_dtype == "int4" and kind != "scale_mid"
        stored[kind] = (dtype, (counts[kind] + 1) // 2 if nibbles else counts[kind] * _size(dtype))
    for kind in KINDS:
        dtype, nbytes = stored[kind]
        file_dtype, _, raw_kind = tensors[kind]
        raw = raw_kind[offset[kind] : offset[kind] + nbytes]
        offset[kind] += nbytes
        if file_dtype != dtype or len(raw) != nbytes:
            return f"{path}.{kind}: loaded although the file's {kind} is {file_dtype}, {len(raw)} bytes for it"
        t = rec.tensors[kind]
        if scale_dtype == "int4" and kind in ("scale_in", "scale_out"):
            codes, problem = nibble_codes(raw, counts[kind])
            if problem:
                return f"{path}.{kind}: loaded although {problem}"
            if t.dtype != torch.int8 or t.tolist() != codes:
                return f"{path}.{kind}: loaded codes differ from the file's nibbles"
            raw, dtype = bytes(c & 0xFF for c in codes), "I8"
        elif t.contiguous().view(torch.uint8).numpy().tobytes() != raw or t.dtype != ST[dtype]:
            return f"{path}.{kind}: loaded values differ from the file's bytes"
        if list(t.shape) != [counts[kind] if not kind.startswith("sign") else nbytes]:
            return f"{path}.{kind}: loaded shape {list(t.shape)}"
        bits = counts[kind] if kind.startswith("sign") else 0
        problem = value_problem(kind, dtype, raw, bits, t)
        if problem:
            return f"{path}.{kind}: loaded although {problem}"
    return None
