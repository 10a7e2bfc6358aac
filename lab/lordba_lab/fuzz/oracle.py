"""The fuzzing oracle: what the loader may do with an untrusted adapter directory.

For a case (the files of an adapter directory), :func:`run_case` calls
:func:`lordba.format.adapter.read_adapter` and classifies the result:

* **refused**: a :class:`~lordba.errors.LoRDBAError` whose message names the file it is about
  (``adapter_config.json`` or ``lordba_model.safetensors``, or a backup of one);
* **loaded**: an adapter that passes :func:`check_loaded`: it is exactly what the chosen pair of
  files holds, read by an independent parser, and it obeys every rule of ``docs/format.md``;
* **unclean**: anything else: another exception (``KeyError``, ``re.error``, ``MemoryError``,
  ``RecursionError``...), an error that does not name the file, a load that breaks a rule or
  differs from the file's content. The engines add timeouts and crashes of the process.

A mutation may give a different *valid* adapter (a flipped sign bit with a fixed checksum): the
oracle then requires the load to succeed with exactly the mutated content. It never compares
with the seed the case came from.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lordba.config import CONFIG_NAME, WEIGHTS_NAME, LoRDBAConfig
from lordba.convert.export import lora_factors
from lordba.core.scales import get_codec
from lordba.errors import LoRDBAError
from lordba.format.adapter import AdapterFile, read_adapter, serialize
from lordba.nn.adapter import PackedAdapter
from lordba_lab.fuzz import oracle_compact
from lordba_lab.fuzz.corpus import PREV_CONFIG, PREV_WEIGHTS, Case

REFUSED, LOADED, UNCLEAN = "refused", "loaded", "unclean"
_ST = {
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
}
_SCALE_DTYPES = {
    "float32": ("F32",) * 3,
    "float16": ("F16",) * 3,
    "bfloat16": ("BF16",) * 3,
    "int8": ("I8", "F32", "I8"),
}
_FLOAT_FIELDS = ("alpha", "ste_k", "ste_clip")


@dataclass
class Result:
    """Outcome of one case: ``outcome`` (refused / loaded / unclean), a short ``kind`` (the error
    class, or what broke), and a ``detail`` message."""

    outcome: str
    kind: str
    detail: str = ""


def write_case(case: Case, directory: Path) -> None:
    """Materialise a case as an adapter directory (emptied first)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name, data in case.items():
        (directory / name).write_bytes(data)


def run_case(case: Case, workdir: Path) -> Result:
    """Load ``case`` from a directory under ``workdir`` and judge the outcome (see module doc)."""
    directory = workdir / "adapter"
    write_case(case, directory)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = read_adapter(directory)
    except LoRDBAError as err:
        message = str(err)
        if not any(name in message for name in (CONFIG_NAME, WEIGHTS_NAME)):
            return Result(UNCLEAN, "unnamed-error", f"{type(err).__name__}: {message}")
        return Result(REFUSED, type(err).__name__, message)
    except Exception as err:  # every other exception is a finding
        return Result(UNCLEAN, type(err).__name__, "".join(traceback.format_exception(err))[-4000:])
    try:
        problem = check_loaded(adapter, case, workdir)
    except Exception as err:
        problem = f"using the loaded adapter raised {type(err).__name__}: {err}"
    if problem:
        return Result(UNCLEAN, "invalid-load", problem)
    return Result(LOADED, "recovered" if adapter.recovered else "current")


def check_loaded(adapter: AdapterFile, case: Case, workdir: Path) -> str | None:
    """``None`` if the loaded ``adapter`` is valid and equal to the files of ``case``, else what is wrong."""
    config_name, weights_name = (PREV_CONFIG, PREV_WEIGHTS) if adapter.recovered else (CONFIG_NAME, WEIGHTS_NAME)
    if config_name not in case or weights_name not in case:
        return f"loaded from {config_name}/{weights_name}, which the case does not have"
    raw_config, weights = case[config_name], case[weights_name]
    sha = hashlib.sha256(weights).hexdigest()
    try:
        config_json = json.loads(raw_config)
    except (ValueError, RecursionError):
        return "loaded although the config is not valid JSON"
    if not (adapter.sha256 == sha == config_json.get("weights_sha256")):
        return "loaded although the config's checksum is not the weights' sha256"
    if adapter.recovered and CONFIG_NAME in case and WEIGHTS_NAME in case:
        current = json.loads(case[CONFIG_NAME]) if _is_json_object(case[CONFIG_NAME]) else {}
        if current.get("weights_sha256") == hashlib.sha256(case[WEIGHTS_NAME]).hexdigest():
            return "read the backups although the current pair is consistent"
    problem = (
        _config_matches(adapter.config, config_json)
        or _digest_matches(config_json, weights)
        or _content_matches(adapter, weights)
    )
    return problem or _round_trip(adapter, workdir) or _usable(adapter)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


def _digest_matches(config_json: dict[str, Any], weights: bytes) -> str | None:
    """A file with a config digest loads only with the config it was written with (computed here
    independently: sorted compact ASCII JSON of every key but the checksum and library version)."""
    try:
        _, metadata = reference_parse(weights)
    except (ValueError, KeyError, TypeError, struct.error, RecursionError) as err:
        return f"loaded although an independent parser rejects the file ({err})"
    stored = metadata.get("config_sha256")
    if stored is None:
        return None
    body = {k: v for k, v in config_json.items() if k not in ("weights_sha256", "library_version")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    if hashlib.sha256(text.encode()).hexdigest() != stored:
        return "loaded although the config differs from the digest stored in the weights (config_sha256)"
    return None


def _config_matches(config: LoRDBAConfig, raw: dict[str, Any]) -> str | None:
    loaded = config.to_dict(getattr(config, "file_version", 1))
    for key, value in raw.items():
        if key in ("weights_sha256", "library_version"):
            continue
        want = float(value) if key in _FLOAT_FIELDS and isinstance(value, (int, float)) else value
        if key not in loaded or loaded[key] != want or type(loaded[key]) is not type(want):
            return f"config field {key!r} loaded as {loaded.get(key)!r}, the file says {value!r}"
    return None


def reference_parse(weights: bytes) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """An independent, minimal safetensors reader: ``{name: (dtype, shape, raw bytes)}`` and the
    metadata. Raises ``ValueError`` on anything malformed (duplicate keys included)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    (n,) = struct.unpack_from("<Q", weights)
    header = json.loads(weights[8 : 8 + n], object_pairs_hook=unique)
    metadata = header.pop("__metadata__")
    data = weights[8 + n :]
    tensors = {}
    for name, entry in header.items():
        start, stop = entry["data_offsets"]
        if not 0 <= start <= stop <= len(data):
            raise ValueError(f"{name}: byte range outside the data")
        tensors[name] = (entry["dtype"], entry["shape"], data[start:stop])
    return tensors, metadata


def _content_matches(adapter: AdapterFile, weights: bytes) -> str | None:
    try:
        tensors, metadata = reference_parse(weights)
        dims = json.loads(metadata["modules"])
    except (ValueError, KeyError, TypeError, struct.error, RecursionError) as err:
        return f"loaded although an independent parser rejects the file ({err})"
    version = metadata.get("format_version")
    if metadata.get("format") != "lordba" or version not in ("1", "3") or version != str(adapter.format_version):
        return "loaded although the metadata's format or version is wrong"
    scale_dtype = adapter.config.scale_dtype
    if metadata.get("scale_dtype") != scale_dtype:
        return "loaded although the metadata's scale dtype differs from the config's"
    if version == "3":
        return oracle_compact.content_problem(adapter, tensors, metadata, value_problem)
    if scale_dtype not in _SCALE_DTYPES:
        return f"loaded although scale_dtype {scale_dtype!r} is not stored in version 1 files"
    if set(dims) != set(adapter.modules):
        return f"loaded modules {sorted(adapter.modules)} but the file lists {sorted(dims)}"
    names = {f"{p}.{k}" for p in dims for k in ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out")}
    if set(tensors) != names:
        return "loaded although the file's tensors are not exactly the five per module"
    for path, rec in adapter.modules.items():
        in_f, out_f, r = dims[path]
        if (rec.in_features, rec.out_features, rec.r) != (in_f, out_f, r) or r != adapter.config.rank_for(path):
            return f"{path}: loaded dims {(rec.in_features, rec.out_features, rec.r)}, file {dims[path]}"
        st_in, st_mid, st_out = _SCALE_DTYPES[scale_dtype]
        spec = {
            "sign_A": ("U8", [(r * in_f + 7) // 8], r * in_f),
            "sign_B": ("U8", [(out_f * r + 7) // 8], out_f * r),
            "scale_in": (st_in, [in_f], 0),
            "scale_mid": (st_mid, [r], 0),
            "scale_out": (st_out, [out_f], 0),
        }
        for kind, (dtype, shape, bits) in spec.items():
            st_dtype, st_shape, raw = tensors[f"{path}.{kind}"]
            t = rec.tensors[kind]
            if (st_dtype, st_shape) != (dtype, shape) or t.dtype != _ST[dtype][0] or list(t.shape) != shape:
                return f"{path}.{kind}: loaded {t.dtype} {list(t.shape)}, file {st_dtype} {st_shape}"
            if t.contiguous().view(torch.uint8).numpy().tobytes() != raw:
                return f"{path}.{kind}: loaded values differ from the file's bytes"
            problem = value_problem(kind, dtype, raw, bits, t)
            if problem:
                return f"{path}.{kind}: loaded although {problem}"
    return None


def value_problem(kind: str, dtype: str, raw: bytes, bits: int, t: torch.Tensor) -> str | None:
    """What is wrong with a stored tensor's values by the format's rules (``bits``: the number of
    signs of a packed tensor), or ``None``."""
    if kind.startswith("sign"):
        pad = (-bits) % 8
        return "padding bits are set" if pad and raw and raw[-1] & ((1 << pad) - 1) else None
    if dtype == "I8":
        codes = [b - 256 if b > 127 else b for b in raw]
        if -128 in codes:
            return "an int8 code is -128"
        return None if max(map(abs, codes), default=0) in (0, 127) else "the int8 codes do not reach 127"
    return None if all(math.isfinite(v) for v in t.float().tolist()) else "a scale is NaN or infinite"


def _round_trip(adapter: AdapterFile, workdir: Path) -> str | None:
    """Saving the loaded adapter and reading it back gives the same adapter; saving is idempotent."""
    version = adapter.format_version
    weights, config = serialize(adapter.config, adapter.modules, adapter.extras, version)
    directory = workdir / "round-trip"
    write_case({CONFIG_NAME: config, WEIGHTS_NAME: weights}, directory)
    again = read_adapter(directory)
    if again.config != adapter.config or again.modules.keys() != adapter.modules.keys():
        return "saving and reloading the adapter changed its config or modules"
    for path, rec in adapter.modules.items():
        for kind, t in rec.tensors.items():
            if not torch.equal(t.view(torch.uint8), again.modules[path].tensors[kind].view(torch.uint8)):
                return f"saving and reloading changed {path}.{kind}"
    if serialize(again.config, again.modules, again.extras, version) != (weights, config):
        return "saving the same adapter twice gave different bytes"
    return None


def _usable(adapter: AdapterFile) -> str | None:
    """Every module can be put into a layer and run, and exports to LoRA factors."""
    codec = get_codec(adapter.config.scale_dtype)
    for path, rec in adapter.modules.items():
        layer = PackedAdapter.from_stored(
            rec.tensors,
            rec.in_features,
            rec.out_features,
            rec.r,
            adapter.config.scaling_for(path),
            codec,
        )
        with torch.no_grad():
            y = layer(torch.ones(2, rec.in_features))
        lora_A, lora_B = lora_factors(rec, adapter.config.scale_dtype)
        if y.shape != (2, rec.out_features) or lora_A.shape != (rec.r, rec.in_features):
            return f"{path}: the loaded module gives outputs of the wrong shape"
        if lora_B.shape != (rec.out_features, rec.r):
            return f"{path}: the loaded module exports LoRA factors of the wrong shape"
    return None
