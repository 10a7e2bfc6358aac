"""Reading, validating and writing the adapter directory of SPEC §6.

Files are untrusted input. Reading goes in this order, and nothing is allocated for tensor data
before the sizes it implies have been checked against the config and the file length:

1. ``adapter_config.json``: size limit, JSON, every field's type and value, format version.
2. Checksum: sha256 of ``lordba_model.safetensors`` (streamed) against the config. If the pair is
   inconsistent but the backups of an interrupted save are consistent, those are read instead.
3. safetensors header: length bound, JSON, metadata (format, version, scale dtype, module
   dims), then every tensor's name, dtype, shape and byte range against the config and metadata.
4. Tensor data (memory-mapped, one tensor at a time): padding bits, finite scales, int8 codes.

Writing serialises deterministically (same adapter, same bytes) and commits weights and config
crash-safely (:func:`lordba.atomic.commit_files`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import __version__
from .atomic import commit_files, consistent_files
from .config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, LoRDBAConfig, read_json_file
from .errors import AdapterFormatError, ConfigError, LoRDBAError
from .packing import check_padding, packed_size
from .scales import get_codec
from .st_format import to_bytes
from .targets import ALL_LINEAR, matches

FORMAT_NAME = "lordba"
MAX_HEADER_BYTES = 64 << 20
TENSOR_KINDS = ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out")
_ST_DTYPES = {
    "U8": torch.uint8,
    "I8": torch.int8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class ModuleRecord:
    """One adapted module as stored: dims and (once loaded) its five tensors."""

    path: str
    in_features: int
    out_features: int
    r: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def expected(self, scale_dtype: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Expected dtype and shape of each stored tensor of this module."""
        dt_in, dt_mid, dt_out = get_codec(scale_dtype).stored_dtypes
        return {
            "sign_A": (torch.uint8, (packed_size(self.r * self.in_features),)),
            "sign_B": (torch.uint8, (packed_size(self.out_features * self.r),)),
            "scale_in": (dt_in, (self.in_features,)),
            "scale_mid": (dt_mid, (self.r,)),
            "scale_out": (dt_out, (self.out_features,)),
        }


@dataclass
class AdapterState:
    """An adapter in memory, independent of any base model: its config and, per module, the
    stored tensors. Conversion returns one; it can be saved, exported, or loaded onto a model
    (``LoRDBAModel.load_adapter_state``)."""

    config: LoRDBAConfig
    modules: dict[str, ModuleRecord]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter directory (crash-safe, deterministic)."""
        return write_adapter(directory, self.config, self.modules)

    def dims(self) -> dict[str, tuple[int, int, int]]:
        """``{module path: (in, out, r)}``."""
        return {p: (m.in_features, m.out_features, m.r) for p, m in self.modules.items()}


@dataclass
class AdapterFile(AdapterState):
    """A validated adapter directory: an :class:`AdapterState` plus file facts."""

    directory: Path = Path(".")
    sha256: str = ""
    weights_path: Path = Path(".")
    weights_bytes: int = 0
    recovered: bool = False

    def load_tensors(self) -> None:
        """Read every tensor (memory-mapped) and check its values; fills ``ModuleRecord.tensors``."""
        path = self.weights_path
        codec_name = self.config.scale_dtype
        try:
            with safe_open(str(path), framework="pt") as f:
                for rec in self.modules.values():
                    rec.tensors = {k: f.get_tensor(f"{rec.path}.{k}") for k in TENSOR_KINDS}
        except LoRDBAError:
            raise
        except Exception as err:  # safetensors' own checks, I/O errors
            raise AdapterFormatError(f"{path}: cannot read tensors ({err})") from None
        for rec in self.modules.values():
            _check_values(rec, codec_name, path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_sha(config_path: Path) -> str:
    raw = read_json_file(config_path)
    sha = raw.get("weights_sha256")
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ConfigError(f"{config_path}: weights_sha256 must be 64 lowercase hex digits, got {sha!r}")
    return sha


def _pair_consistent(paths: dict[str, Path]) -> bool:
    try:
        return _config_sha(paths[CONFIG_NAME]) == file_sha256(paths[WEIGHTS_NAME])
    except (LoRDBAError, OSError):
        return False


def open_adapter(directory: str | Path) -> AdapterFile:
    """Validate an adapter directory up to the tensor headers (steps 1–3); tensors load lazily."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    config = LoRDBAConfig.from_dict(_read_config(directory), source=str(config_path))
    found = consistent_files(directory, [WEIGHTS_NAME, CONFIG_NAME], _pair_consistent)
    recovered = False
    if found is None:
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise AdapterFormatError(f"{weights}: missing")
        expected = _config_sha(config_path)
        raise AdapterFormatError(
            f"{weights}: checksum mismatch (sha256 {file_sha256(weights)}, adapter_config.json says "
            f"{expected}): the file is corrupt, truncated or was modified"
        )
    if found[CONFIG_NAME] != config_path:
        recovered = True
        warnings.warn(
            f"{directory}: an interrupted save left an inconsistent adapter; reading the previous, "
            "intact version (the next save restores it)",
            stacklevel=2,
        )
        config = LoRDBAConfig.from_dict(read_json_file(found[CONFIG_NAME]), source=str(found[CONFIG_NAME]))
    weights_path = found[WEIGHTS_NAME]
    sha = _config_sha(found[CONFIG_NAME])
    size = weights_path.stat().st_size
    header, metadata, header_len = _read_header(weights_path, size)
    modules = _check_header(header, metadata, config, weights_path, size - 8 - header_len)
    return AdapterFile(config, modules, directory, sha, weights_path, size, recovered)


def read_adapter(directory: str | Path) -> AdapterFile:
    """Fully read and validate an adapter directory (all four steps)."""
    adapter = open_adapter(directory)
    adapter.load_tensors()
    return adapter


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: not a directory")
    return read_json_file(directory / CONFIG_NAME)


def _read_header(path: Path, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    if size < 8:
        raise AdapterFormatError(f"{path}: {size} bytes, too short for a safetensors file (truncated)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise AdapterFormatError(
                f"{path}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AdapterFormatError(f"{path}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{path}: missing or malformed __metadata__ (format, version, modules)")
    return header, metadata, n


def _reject(name: str) -> None:
    raise json.JSONDecodeError(f"non-standard constant {name}", name, 0)


def _check_header(
    header: dict[str, Any], metadata: dict[str, str], config: LoRDBAConfig, path: Path, data_bytes: int
) -> dict[str, ModuleRecord]:
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFormatError(f"{path}: metadata format is {metadata.get('format')!r}, not {FORMAT_NAME!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise AdapterFormatError(
            f"{path}: metadata format_version {metadata.get('format_version')!r} is not supported "
            f"(this lordba reads {FORMAT_VERSION})"
        )
    if metadata.get("scale_dtype") != config.scale_dtype:
        raise AdapterFormatError(
            f"{path}: metadata scale_dtype {metadata.get('scale_dtype')!r} differs from the config's "
            f"{config.scale_dtype!r}"
        )
    try:
        dims = json.loads(metadata.get("modules", ""), parse_constant=_reject)
    except (json.JSONDecodeError, RecursionError):
        raise AdapterFormatError(f"{path}: metadata 'modules' is not valid JSON") from None
    if not isinstance(dims, dict) or not dims:
        raise AdapterFormatError(f"{path}: metadata 'modules' must be a non-empty object of [in, out, r]")
    modules: dict[str, ModuleRecord] = {}
    for name, value in dims.items():
        ok = isinstance(value, list) and len(value) == 3 and all(type(v) is int and 0 < v < 1 << 31 for v in value)
        if not ok:
            raise AdapterFormatError(f"{path}: module {name!r}: dims must be [in, out, r] positive ints, got {value!r}")
        in_f, out_f, r = value
        if r != config.rank_for(name):
            raise AdapterFormatError(
                f"{path}: module {name!r} has rank {r} but the config gives it rank {config.rank_for(name)}"
            )
        targets = config.target_modules
        if targets not in (None, ALL_LINEAR) and not matches(targets, name):
            raise AdapterFormatError(f"{path}: module {name!r} is not matched by target_modules={targets!r}")
        modules[name] = ModuleRecord(name, in_f, out_f, r)
    expected_names = {f"{n}.{k}" for n in modules for k in TENSOR_KINDS}
    missing = sorted(expected_names - set(header))
    extra = sorted(set(header) - expected_names)
    if missing:
        raise AdapterFormatError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise AdapterFormatError(f"{path}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    spans = []
    for rec in modules.values():
        for kind, (dtype, shape) in rec.expected(config.scale_dtype).items():
            name = f"{rec.path}.{kind}"
            entry = header[name]
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise AdapterFormatError(f"{path}: tensor {name}: malformed header entry")
            st_dtype = _ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
            if st_dtype != dtype:
                raise AdapterFormatError(
                    f"{path}: tensor {name}: dtype {entry['dtype']!r}, expected {_ST_NAMES[dtype]}"
                )
            if entry["shape"] != list(shape):
                raise AdapterFormatError(f"{path}: tensor {name}: shape {entry['shape']!r}, expected {list(shape)}")
            offsets = entry["data_offsets"]
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                raise AdapterFormatError(f"{path}: tensor {name}: malformed data_offsets {offsets!r}")
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if offsets[1] - offsets[0] != nbytes or offsets[0] < 0:
                raise AdapterFormatError(
                    f"{path}: tensor {name}: byte range {offsets} holds {offsets[1] - offsets[0]} bytes, "
                    f"expected {nbytes}"
                )
            spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise AdapterFormatError(
                f"{path}: tensor {name}: data does not follow the previous tensor (gap or overlap)"
            )
        end = stop
    if end != data_bytes:
        raise AdapterFormatError(
            f"{path}: the file holds {data_bytes} data bytes but its header describes {end} (truncated or padded)"
        )
    return modules


def _check_values(rec: ModuleRecord, scale_dtype: str, path: Path) -> None:
    for kind, numel in (("sign_A", rec.r * rec.in_features), ("sign_B", rec.out_features * rec.r)):
        check_padding(rec.tensors[kind], numel, f"{path}: tensor {rec.path}.{kind}")
    for kind in ("scale_in", "scale_mid", "scale_out"):
        t = rec.tensors[kind]
        name = f"{path}: tensor {rec.path}.{kind}"
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{name}: holds NaN or infinite values")
        elif scale_dtype == "int8":
            if bool((t == -128).any()):
                raise AdapterFormatError(f"{name}: int8 code -128 is outside the format's range [-127, 127]")
            peak = int(t.abs().max()) if t.numel() else 0
            if peak not in (0, 127):
                raise AdapterFormatError(f"{name}: a non-zero int8 scale vector must reach code ±127 (max is {peak})")


def lordba_metadata(scale_dtype: str, modules: dict[str, ModuleRecord]) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an adapter file."""
    dims = {n: [r.in_features, r.out_features, r.r] for n, r in sorted(modules.items())}
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "scale_dtype": scale_dtype,
        "modules": json.dumps(dims, separators=(",", ":"), sort_keys=True),
    }


def serialize(config: LoRDBAConfig, modules: dict[str, ModuleRecord]) -> tuple[bytes, bytes]:
    """``(weights bytes, config bytes)`` of an adapter; deterministic for the same content."""
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        rec = modules[name]
        for kind, (dtype, shape) in rec.expected(config.scale_dtype).items():
            t = rec.tensors[kind]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise AdapterFormatError(
                    f"cannot save {name}.{kind}: {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"cannot save {name}.{kind}: it holds NaN or infinite values")
            tensors[f"{name}.{kind}"] = t.contiguous()
    weights = to_bytes(tensors, lordba_metadata(config.scale_dtype, modules))
    extra = {"weights_sha256": hashlib.sha256(weights).hexdigest(), "library_version": __version__}
    text = json.dumps({**config.to_dict(), **extra}, indent=2) + "\n"
    return weights, text.encode()


def write_adapter(directory: str | Path, config: LoRDBAConfig, modules: dict[str, ModuleRecord]) -> Path:
    """Write an adapter directory crash-safely; returns the directory."""
    if not modules:
        raise AdapterFormatError("refusing to save an adapter with no modules")
    weights, config_bytes = serialize(config, modules)
    commit_files(directory, {WEIGHTS_NAME: weights, CONFIG_NAME: config_bytes}, _pair_consistent)
    return Path(directory)
