"""Fuzz cases: small valid adapter directories to start from, and their byte container.

A *case* is the content of an adapter directory, ``{file name: bytes}``, over the four names the
loader looks at (the config, the weights, and the two backups an interrupted save leaves). Seeds
are tiny but cover every scale dtype, per-module ranks (``rank_pattern``), ``alpha_pattern``, the
three kinds of ``target_modules`` and dims that leave padding bits in the packed signs; in format
version 1 (:func:`seed_cases`) and in the compact version 3 (:func:`compact_seed_cases`: int4
scales, odd lengths that leave padding nibbles, runs of layers whose module list folds).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
from pathlib import Path

import torch

from lordba.config import CONFIG_NAME, WEIGHTS_NAME, LoRDBAConfig
from lordba.core.packing import pack_signs
from lordba.core.scales import get_codec
from lordba.errors import LoRDBAError
from lordba.format.adapter import AdapterState, ModuleRecord, serialize
from lordba.format.commit import backup_path
from lordba.format.integrity import config_digest

Case = dict[str, bytes]
PREV_CONFIG = backup_path(Path(CONFIG_NAME)).name
PREV_WEIGHTS = backup_path(Path(WEIGHTS_NAME)).name
FILE_NAMES = (CONFIG_NAME, WEIGHTS_NAME, PREV_CONFIG, PREV_WEIGHTS)
_MAGIC = b"LDBFZ1"
_PATHS = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.1.mlp.up_proj",
    "encoder.block.2.attn-out",
)
V1_SCALE_DTYPES = ("float32", "float16", "bfloat16", "int8")
V3_SCALE_DTYPES = ("int4", "int8", "float16", "bfloat16", "float32")
_SHA_TEXT = re.compile(rb'"weights_sha256"\s*:\s*"[^"]*"')
_DIGEST_TEXT = re.compile(rb'"config_sha256"\s*:\s*"([0-9a-f]{64})"')


def random_state(rng: random.Random, scale_dtype: str | None = None, layers: int = 0) -> AdapterState:
    """A small random adapter: 1-3 modules, dims 1-24 (padding bits likely), rank 1-5; with
    ``layers``, also ``model.layers.{0..layers-1}.mlp.gate_proj`` of equal dims (a run that folds)."""
    scale_dtype = scale_dtype or rng.choice(V1_SCALE_DTYPES)
    r = rng.randint(1, 5)
    paths = sorted(rng.sample(_PATHS, rng.randint(1, 3)))
    run = [f"model.layers.{i}.mlp.gate_proj" for i in range(layers)]
    rank_pattern: dict[str, int] = {}
    if len(paths) > 1 and rng.random() < 0.4:
        rank_pattern[re.escape(paths[0].rsplit(".", 1)[-1])] = rng.randint(1, 5)
    alpha_pattern = {"down_proj": 3.5} if rng.random() < 0.3 else {}
    targets = rng.choice([None, "all-linear", sorted({p.rsplit(".", 1)[-1] for p in paths + run}), r".*(proj|out)"])
    config = LoRDBAConfig(
        r=r,
        alpha=rng.choice([1.0, 8.0, 16.0, 2.5]),
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        scale_dtype=scale_dtype,
        mode=rng.choice(["ptq", "qat"]),
        base_model_name_or_path=rng.choice([None, "tiny"]),
    )
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    codec = get_codec(scale_dtype)
    modules = {}
    run_dims = (rng.randint(1, 24), rng.randint(1, 24)) if run else (0, 0)
    for path in sorted(paths + run):
        in_f, out_f = run_dims if path in run else (rng.randint(1, 24), rng.randint(1, 24))
        rank = config.rank_for(path)
        b, m, a = (torch.randn(n, generator=gen) for n in (in_f, rank, out_f))
        if rng.random() < 0.2:
            a = torch.zeros(out_f)  # a cold adapter's scale_out (int8: the all-zero vector rule)
        b, m, a = codec.encode(b, m, a)
        tensors = {
            "sign_A": pack_signs(torch.randn(rank, in_f, generator=gen)),
            "sign_B": pack_signs(torch.randn(out_f, rank, generator=gen)),
            "scale_in": b,
            "scale_mid": m,
            "scale_out": a,
        }
        modules[path] = ModuleRecord(path, in_f, out_f, rank, tensors)
    return AdapterState(config, modules)


def state_case(state: AdapterState, format_version: int = 1) -> Case:
    """The directory content ``save_pretrained(..., format_version=format_version)`` writes for ``state``."""
    weights, config = serialize(state.config, state.modules, None, format_version)
    return {CONFIG_NAME: config, WEIGHTS_NAME: weights}


def all_seed_cases(seed: int = 0) -> list[Case]:
    """What the engines start from: :func:`seed_cases` (version 1) and :func:`compact_seed_cases`."""
    return seed_cases(seed=seed) + compact_seed_cases(seed=seed)


def compact_seed_cases(count: int = 10, seed: int = 0) -> list[Case]:
    """Deterministic valid version 3 seeds: every scale dtype (int4 first), a third with a run of
    layers that folds in the module list, and a backup pair."""
    rng = random.Random(seed + 1)
    cases = [
        state_case(random_state(rng, V3_SCALE_DTYPES[i % len(V3_SCALE_DTYPES)], layers=(i % 3) * 2), 3)
        for i in range(count)
    ]
    cases.append({CONFIG_NAME: cases[0][CONFIG_NAME], WEIGHTS_NAME: cases[1][WEIGHTS_NAME], **as_backups(cases[0])})
    return cases


def seed_cases(count: int = 24, seed: int = 0) -> list[Case]:
    """Deterministic valid version 1 seeds: every scale dtype of version 1, and a few directories
    holding the backups of an interrupted save (an inconsistent current pair beside an intact
    previous one)."""
    rng = random.Random(seed)
    cases = [state_case(random_state(rng, V1_SCALE_DTYPES[i % len(V1_SCALE_DTYPES)])) for i in range(count)]
    for i in range(0, count, 6):
        old, new = cases[i], cases[(i + 1) % count]
        cases.append({CONFIG_NAME: old[CONFIG_NAME], WEIGHTS_NAME: new[WEIGHTS_NAME], **as_backups(old)})
    return cases


def as_backups(case: Case) -> Case:
    """The config and weights of ``case`` under the backup names."""
    out = {}
    if CONFIG_NAME in case:
        out[PREV_CONFIG] = case[CONFIG_NAME]
    if WEIGHTS_NAME in case:
        out[PREV_WEIGHTS] = case[WEIGHTS_NAME]
    return out


def fix_checksum(case: Case, backups: bool = False, digest: bool = True) -> Case:
    """Set the config's ``weights_sha256`` to the weights' real checksum (so that validation past
    the checksum is reached). Works on configs that are no longer valid JSON, as text. With
    ``digest``, first store the digest of the (JSON object) config in the weights' metadata, where a
    ``config_sha256`` is, so that a changed config field gets past the config's integrity check."""
    out = dict(case)
    pairs = [(CONFIG_NAME, WEIGHTS_NAME)] + ([(PREV_CONFIG, PREV_WEIGHTS)] if backups else [])
    for config_name, weights_name in pairs:
        if config_name not in out or weights_name not in out:
            continue
        if digest:
            out[weights_name] = fix_digest(out[config_name], out[weights_name])
        sha = hashlib.sha256(out[weights_name]).hexdigest()
        try:
            data = json.loads(out[config_name])
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict) and data.get("weights_sha256") != sha:
            data["weights_sha256"] = sha
            out[config_name] = (json.dumps(data, indent=2) + "\n").encode()
        elif data is None:
            out[config_name] = _SHA_TEXT.sub(f'"weights_sha256": "{sha}"'.encode(), out[config_name], count=1)
    return out


def fix_digest(config: bytes, weights: bytes) -> bytes:
    """``weights`` with the ``config_sha256`` in its header replaced (in place: the same length) by
    the digest of ``config``, if the config is a JSON object and the header holds one; else unchanged."""
    try:
        fields = json.loads(config)
        new = config_digest(fields).encode() if isinstance(fields, dict) else None
    except (ValueError, RecursionError, LoRDBAError):
        new = None
    found = _DIGEST_TEXT.search(weights[: 8 + (declared_length(weights) or 0)])
    if new is None or found is None:
        return weights
    return weights[: found.start(1)] + new + weights[found.end(1) :]


def declared_length(data: bytes) -> int | None:
    """The header length safetensors bytes declare, or ``None`` if they are shorter than 8 bytes."""
    return struct.unpack_from("<Q", data)[0] if len(data) >= 8 else None


def encode_case(case: Case) -> bytes:
    """A case as one byte string (the fuzzers' input and the saved failures' format)."""
    parts = [_MAGIC]
    for index, name in enumerate(FILE_NAMES):
        if name in case:
            parts.append(struct.pack("<BI", index, len(case[name])) + case[name])
    return b"".join(parts)


def decode_case(data: bytes) -> Case:
    """Inverse of :func:`encode_case`; any byte string decodes (a damaged tail is dropped), so a
    coverage-guided fuzzer's raw mutations always give a case."""
    case: Case = {}
    pos = len(_MAGIC) if data.startswith(_MAGIC) else 0
    while pos + 5 <= len(data):
        index, n = struct.unpack_from("<BI", data, pos)
        pos += 5
        case[FILE_NAMES[index % len(FILE_NAMES)]] = data[pos : pos + n]
        pos += n
    return case
