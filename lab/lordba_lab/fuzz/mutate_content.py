"""Mutators of tensor values (padding bits, signs, NaN/inf and int8 codes), of the config (fields,
versions, regular expressions, odd numbers, raw text, checksum) and of the directory (the
backups an interrupted save leaves)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from lordba.config import CONFIG_NAME, WEIGHTS_NAME
from lordba_lab.fuzz.corpus import PREV_CONFIG, PREV_WEIGHTS, Case, as_backups
from lordba_lab.fuzz.mutate_base import (
    FLOAT_BITS,
    ITEMSIZE,
    ODD_VALUES,
    RAW_NUMBERS,
    Mutator,
    raw_json_edit,
    registry,
    tensor_entries,
    with_config,
    with_weights,
)

MUTATORS: dict[str, Mutator] = {}
mutator = registry(MUTATORS)


# ----------------------------------------------------------------------------- tensor data
def _data_edit(case: Case, rng: random.Random, kinds: tuple[str, ...], edit: Callable[[bytearray, str], None]) -> Case:
    def fn(h: dict[str, Any], d: bytes) -> tuple[dict[str, Any], bytes] | None:
        ents = [e for e in tensor_entries(h, d) if e[0].rsplit(".", 1)[-1] in kinds and e[3] > e[2]]
        if not ents:
            return None
        _, dtype, start, stop = rng.choice(ents)
        chunk = bytearray(d[start:stop])
        edit(chunk, dtype)
        return h, d[:start] + bytes(chunk) + d[stop:]

    return with_weights(case, fn)


@mutator
def padding_bits(rng: random.Random, case: Case) -> Case:
    """Set low bits of a packed sign tensor's last byte (padding where r·in is not a multiple of 8)."""

    def edit(chunk: bytearray, dtype: str) -> None:
        chunk[-1] |= 1 << rng.randrange(8)

    return _data_edit(case, rng, ("sign_A", "sign_B"), edit)


@mutator
def sign_bits(rng: random.Random, case: Case) -> Case:
    """Flip a bit of a packed sign tensor (a different, usually valid adapter)."""

    def edit(chunk: bytearray, dtype: str) -> None:
        chunk[rng.randrange(len(chunk))] ^= 1 << rng.randrange(8)

    return _data_edit(case, rng, ("sign_A", "sign_B"), edit)


@mutator
def scale_value(rng: random.Random, case: Case) -> Case:
    """NaN, infinity, a flipped sign bit, or (int8) the codes -128, 0 and ±127 in a scale vector."""

    def edit(chunk: bytearray, dtype: str) -> None:
        size = ITEMSIZE.get(dtype, 1)
        i = rng.randrange(max(len(chunk) // size, 1)) * size
        choice = rng.randrange(3)
        if dtype in FLOAT_BITS and choice < 2:
            chunk[i : i + size] = FLOAT_BITS[dtype][choice]
        elif dtype == "I8" and choice < 2:
            chunk[i] = rng.choice([0x80, 0x00, 0x7F, 0x81, 0x01])
        else:
            chunk[min(i + size - 1, len(chunk) - 1)] ^= 0x80  # the sign bit (little-endian)

    return _data_edit(case, rng, ("scale_in", "scale_mid", "scale_out"), edit)


@mutator
def int8_peak(rng: random.Random, case: Case) -> Case:
    """Shrink an int8 vector's codes so its max is no longer 127 (breaks the normalisation rule)."""

    def edit(chunk: bytearray, dtype: str) -> None:
        if dtype == "I8":
            for i, c in enumerate(chunk):
                v = c - 256 if c > 127 else c
                chunk[i] = (v // 2) & 0xFF

    return _data_edit(case, rng, ("scale_in", "scale_out"), edit)


# ----------------------------------------------------------------------------- config
_CONFIG_FIELDS = (
    "peft_type", "format_version", "r", "alpha", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "scale_dtype", "init", "ste", "ste_k", "ste_clip", "mode", "latent_dtype",
    "base_model_name_or_path", "weights_sha256", "library_version",
)  # fmt: skip


@mutator
def config_field(rng: random.Random, case: Case) -> Case:
    def fn(c: dict[str, Any]) -> dict[str, Any]:
        key = rng.choice(_CONFIG_FIELDS)
        choice = rng.randrange(4)
        if choice == 0:
            return {k: v for k, v in c.items() if k != key}
        if choice == 1:
            return {**c, rng.choice(["surprise", "lora_alpha", "", "R"]): rng.choice(ODD_VALUES)}
        return {**c, key: rng.choice(ODD_VALUES)}

    return with_config(case, fn)


@mutator
def config_version(rng: random.Random, case: Case) -> Case:
    def fn(c: dict[str, Any]) -> dict[str, Any]:
        if rng.random() < 0.5:
            return {**c, "format_version": rng.choice([0, 2, 99, -1, "1", 1.0, True, None, 2**64])}
        return {**c, "peft_type": rng.choice(["LORA", "lordba", "", None, 1])}

    return with_config(case, fn)


@mutator
def config_patterns(rng: random.Random, case: Case) -> Case:
    """Regular expressions from the file: invalid, catastrophic, or valid with another meaning."""
    patterns = [
        "(",
        "[",
        "(a+)+$",
        "(?:a|aa)*b",
        r"(\w)\1",
        ".*.*.*",
        r"\d{2,}",
        ".*",
        "(?i)Q_PROJ",
        "q_proj|",
        "$",
        "x" * 2000,
    ]

    def fn(c: dict[str, Any]) -> dict[str, Any]:
        key = rng.choice(["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"])
        pat = rng.choice(patterns)
        if key in ("rank_pattern", "alpha_pattern"):
            return {**c, key: {pat: rng.choice([1, 2, 3, 0, -1, 2.5, "2"])}}
        return {**c, key: rng.choice([pat, [pat], None])}

    return with_config(case, fn)


def _hang_shape(rng: random.Random) -> str:
    """A pattern Python's backtracking engine takes exponential time on, against any module path of
    about ``n`` characters (the shapes an earlier guard let through: optional items, bounded repeats,
    alternations), or against names made of ``a``."""
    n = rng.randint(8, 40)
    return rng.choice(
        [
            ".?" * n + "." * n,
            ".{0,1}" * n + "." * n,
            "(?:.|.)?" * n + "z",
            "(.|.)*z",
            "a?" * n + "a" * n,
            "(a|a)?" * n + "b",
            f"(?:[a-z_.]{{0,{rng.randint(2, 9)}}}){{0,{rng.randint(2, 9)}}}x",
        ]
    )


_REGEX_SHAPED = [
    r".*decoder.*(self_attn|encoder_attn).*(q_proj|v_proj)$",
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r"(\w)\1",
    "^(?!.*vision).*q_proj$",
    r"(?<=attn\.)q_proj",
    "(?P<x>q)(?P=x)",
    "a{1001}",
    "((((((((((a{0,100}){0,100}){0,100})))))))){0,100}",
    "(?i)Q_PROJ",
    "[[:alpha:]]+_proj",
    "\\p{Greek}",
    "\ud800",
    "q_proj\x00",
    "é.*",
]


@mutator
def config_regex(rng: random.Random, case: Case) -> Case:
    """Regex-shaped strings in every pattern field: exponential-backtracking shapes, what RE2 cannot
    run (backreferences, lookaround), huge repeats, PEFT's documented patterns."""

    def fn(c: dict[str, Any]) -> dict[str, Any]:
        pat = _hang_shape(rng) if rng.random() < 0.5 else rng.choice(_REGEX_SHAPED)
        key = rng.choice(["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"])
        if key == "rank_pattern":
            return {**c, key: {**(c.get(key) if isinstance(c.get(key), dict) else {}), pat: rng.randint(1, 5)}}
        if key == "alpha_pattern":
            return {**c, key: {pat: rng.choice([1.0, 3.5, 8.0])}}
        return {**c, key: rng.choice([pat, f"({pat}|.*)", [pat]])}

    return with_config(case, fn)


@mutator
def config_bitflip(rng: random.Random, case: Case) -> Case:
    """One flipped bit anywhere in the config's bytes (a bit rot the digest must catch, unless the
    case's digest is fixed up afterwards: then it is a deliberately different config)."""
    raw = case.get(CONFIG_NAME)
    if not raw:
        return case
    data = bytearray(raw)
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    return {**case, CONFIG_NAME: bytes(data)}


@mutator
def config_numbers(rng: random.Random, case: Case) -> Case:
    """Numbers that JSON allows but Python trips over: huge ints, 1e400, NaN literals."""

    def fn(c: dict[str, Any]) -> bytes:
        key = rng.choice(["r", "alpha", "ste_k", "format_version", "rank_pattern"])
        text = json.dumps({**c, key: "@@"}, indent=2).encode()
        value = rng.choice(RAW_NUMBERS)
        if key == "rank_pattern":
            value = b'{"q_proj": ' + value + b"}"
        return text.replace(b'"@@"', value)

    return with_config(case, fn)


@mutator
def config_text(rng: random.Random, case: Case) -> Case:
    """Raw edits of the config JSON (duplicate keys, nesting, bad UTF-8, ...) and oversize files."""
    raw = case.get(CONFIG_NAME, b"").rstrip()
    if rng.random() < 0.1:
        return {**case, CONFIG_NAME: raw + b" " * ((1 << 20) + 1 - len(raw))}
    return {**case, CONFIG_NAME: raw_json_edit(rng, raw)}


@mutator
def config_checksum(rng: random.Random, case: Case) -> Case:
    def fn(c: dict[str, Any]) -> dict[str, Any]:
        sha = c.get("weights_sha256")
        sha = sha if isinstance(sha, str) else "0" * 64
        return {**c, "weights_sha256": rng.choice([sha.upper(), sha[:-1], sha + "0", "0" * 64, "", None, 0])}

    return with_config(case, fn)


# ----------------------------------------------------------------------------- directory
@mutator
def interrupted_save(rng: random.Random, case: Case) -> Case:
    """Turn the directory into what a save killed between its renames leaves: the current pair
    becomes inconsistent and the backups hold the previous pair (or only part of it)."""
    out = {**case, **as_backups(case)}
    if WEIGHTS_NAME in out:
        out[WEIGHTS_NAME] = out[WEIGHTS_NAME] + b" "
    if rng.random() < 0.2:
        out.pop(rng.choice([PREV_CONFIG, PREV_WEIGHTS]), None)
    return out
