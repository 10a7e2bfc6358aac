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
crash-safely (:func:`lordba.format.atomic.commit_files`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lordba._util.hashing import file_sha256, stream_sha256
from lordba._util.jsonio import parse_json, read_json_file, safe_repr
from lordba._version import __version__
from lordba.config import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, LoRDBAConfig
from lordba.core.packing import check_padding, packed_size
from lordba.core.scales import get_codec
from lordba.errors import AdapterFormatError, ConfigError, LoRDBAError
from lordba.format.atomic import backup_path, commit_files
from lordba.format.tensorfile import to_bytes

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
# A module path: dot-separated names of letters, digits, "_" and "-" (what PyTorch models use).
_MODULE_PATH_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_MODULE_PATH = 256
_INTERNAL = ("base_layer", "lordba_adapters")  # names inside a LoRDBA layer, never a target
_ATTEMPTS = 3


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
    """A validated adapter directory: an :class:`AdapterState` plus file facts.

    It keeps the weights file open from :func:`open_adapter` until :meth:`load_tensors` (or
    :meth:`close`), so the checksum, the header and the tensors all come from one file even if a
    save replaces the directory's files in between."""

    directory: Path = Path(".")
    sha256: str = ""
    weights_path: Path = Path(".")
    weights_bytes: int = 0
    recovered: bool = False
    _file: BinaryIO | None = field(default=None, repr=False, compare=False)
    _spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def load_tensors(self) -> None:
        """Read every tensor (one at a time, from the file whose checksum was verified) and check
        its values; fills ``ModuleRecord.tensors``."""
        if all(rec.tensors for rec in self.modules.values()):
            return
        path = self.weights_path
        f = self._file
        if f is None or f.closed:
            f = _open_verified(path, self.sha256)
        try:
            for rec in self.modules.values():
                rec.tensors = {k: _read_tensor(f, path, f"{rec.path}.{k}", self._spans) for k in TENSOR_KINDS}
        except OSError as err:
            raise AdapterFormatError(f"{path}: cannot read tensors ({err.strerror or err})") from None
        finally:
            f.close()
        for rec in self.modules.values():
            _check_values(rec, self.config.scale_dtype, path)

    def close(self) -> None:
        """Close the weights file (done by :meth:`load_tensors`; needed only if it is not called)."""
        if self._file is not None:
            self._file.close()


def _config_sha(config_path: Path) -> str:
    return _sha_field(read_json_file(config_path), config_path)


def _sha_field(raw: dict[str, Any], config_path: Path) -> str:
    sha = raw.get("weights_sha256")
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ConfigError(f"{config_path}: weights_sha256 must be 64 lowercase hex digits, got {safe_repr(sha)}")
    return sha


def _pair_consistent(paths: dict[str, Path]) -> bool:
    try:
        return _config_sha(paths[CONFIG_NAME]) == file_sha256(paths[WEIGHTS_NAME])
    except (LoRDBAError, OSError):
        return False


class _Inconsistent(AdapterFormatError):
    """The weights file is missing or does not match the config's checksum."""


def _open_verified(path: Path, sha: str) -> BinaryIO:
    """``path`` opened for reading, after checking that its sha256 is ``sha``."""
    try:
        f = open(path, "rb")
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot open ({err.strerror or err})") from None
    try:
        actual = stream_sha256(f)
    except OSError as err:
        f.close()
        raise AdapterFormatError(f"{path}: cannot read ({err.strerror or err})") from None
    if actual != sha:
        f.close()
        raise _Inconsistent(
            f"{path}: checksum mismatch (sha256 {actual}, adapter_config.json says {sha}): the file is "
            "corrupt, truncated or was modified"
        )
    return f


@dataclass
class _Pair:
    """A config and the open weights file its checksum matches, each read once."""

    config: LoRDBAConfig
    config_path: Path
    weights_path: Path
    sha: str
    file: BinaryIO


def _read_pair(config_path: Path, weights_path: Path) -> _Pair:
    raw = read_json_file(config_path)
    config = LoRDBAConfig.from_dict(raw, source=str(config_path))
    sha = _sha_field(raw, config_path)
    if not weights_path.is_file():
        raise _Inconsistent(f"{weights_path}: missing")
    return _Pair(config, config_path, weights_path, sha, _open_verified(weights_path, sha))


def _consistent_pair(directory: Path) -> tuple[_Pair, bool]:
    """The current pair, or the intact previous pair an interrupted save left (``recovered``)."""
    try:  # an invalid current config is reported, not papered over by a backup
        return _read_pair(directory / CONFIG_NAME, directory / WEIGHTS_NAME), False
    except _Inconsistent as err:
        failure = err
    backups = [backup_path(directory / name) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    if all(p.is_file() for p in backups):
        try:
            return _read_pair(*backups), True
        except (LoRDBAError, OSError):
            pass
    raise failure


def open_adapter(directory: str | Path) -> AdapterFile:
    """Validate an adapter directory up to the tensor headers (steps 1–3); tensors load lazily."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: not a directory")
    for attempt in range(_ATTEMPTS):
        stamp = _stamp(directory / CONFIG_NAME)
        try:
            pair, recovered = _consistent_pair(directory)
            break
        except _Inconsistent:
            # A save that finished while we read can leave us with the old config and the new
            # weights (a mismatch, and the backups gone): read again if the config changed.
            if attempt + 1 == _ATTEMPTS or _stamp(directory / CONFIG_NAME) == stamp:
                raise
    if recovered:
        warnings.warn(
            f"{directory}: an interrupted save left an inconsistent adapter; reading the previous, "
            "intact version (the next save restores it)",
            stacklevel=2,
        )
    f = pair.file
    try:
        size = os.fstat(f.fileno()).st_size
        header, metadata, header_len = _read_header(f, pair.weights_path, size)
        modules, spans = _check_header(header, metadata, pair.config, pair.weights_path, size - 8 - header_len)
    except BaseException:
        f.close()
        raise
    spans = {
        name: (dtype, shape, 8 + header_len + start, 8 + header_len + stop)
        for name, (dtype, shape, start, stop) in spans.items()
    }
    return AdapterFile(pair.config, modules, directory, pair.sha, pair.weights_path, size, recovered, f, spans)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_adapter(directory: str | Path) -> AdapterFile:
    """Fully read and validate an adapter directory (all four steps)."""
    adapter = open_adapter(directory)
    adapter.load_tensors()
    return adapter


def _read_header(f: BinaryIO, path: Path, size: int) -> tuple[dict[str, Any], dict[str, str], int]:
    if size < 8:
        raise AdapterFormatError(f"{path}: {size} bytes, too short for a safetensors file (truncated)")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFormatError(
            f"{path}: header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit"
        )
    raw = f.read(n)
    if len(raw) != n:
        raise AdapterFormatError(f"{path}: the file ended inside its header (truncated)")
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{path}: missing or malformed __metadata__ (format, version, modules)")
    return header, metadata, n


def _read_tensor(
    f: BinaryIO, path: Path, name: str, spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
) -> torch.Tensor:
    dtype, shape, start, stop = spans[name]
    buf = bytearray(stop - start)
    f.seek(start)
    if f.readinto(buf) != len(buf):
        raise AdapterFormatError(f"{path}: tensor {name}: the file ended inside its data (truncated)")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _reject(name: str) -> None:
    raise json.JSONDecodeError(f"non-standard constant {name}", name, 0)


def _check_header(
    header: dict[str, Any], metadata: dict[str, str], config: LoRDBAConfig, path: Path, data_bytes: int
) -> tuple[dict[str, ModuleRecord], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """Modules and, per tensor name, ``(dtype, shape, start, stop)`` relative to the data section."""
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFormatError(f"{path}: metadata format is {safe_repr(metadata.get('format'))}, not {FORMAT_NAME!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise AdapterFormatError(
            f"{path}: metadata format_version {safe_repr(metadata.get('format_version'))} is not supported "
            f"(this lordba reads {FORMAT_VERSION})"
        )
    if metadata.get("scale_dtype") != config.scale_dtype:
        raise AdapterFormatError(
            f"{path}: metadata scale_dtype {safe_repr(metadata.get('scale_dtype'))} differs from the config's "
            f"{config.scale_dtype!r}"
        )
    dims = parse_json(metadata.get("modules", "").encode("utf-8", "surrogatepass"), f"{path}: metadata 'modules'")
    if not isinstance(dims, dict) or not dims:
        raise AdapterFormatError(f"{path}: metadata 'modules' must be a non-empty object of [in, out, r]")
    modules: dict[str, ModuleRecord] = {}
    for name, value in dims.items():
        _check_module_path(name, path)
        ok = isinstance(value, list) and len(value) == 3 and all(type(v) is int and 0 < v < 1 << 31 for v in value)
        if not ok:
            raise AdapterFormatError(
                f"{path}: module {name!r}: dims must be [in, out, r] positive ints, got {safe_repr(value)}"
            )
        in_f, out_f, r = value
        if r != config.rank_for(name):
            raise AdapterFormatError(
                f"{path}: module {name!r} has rank {r} but the config gives it rank {config.rank_for(name)}"
            )
        if not config.targets_module(name):
            raise AdapterFormatError(
                f"{path}: module {name!r} is not matched by target_modules={safe_repr(config.target_modules)}"
            )
        modules[name] = ModuleRecord(name, in_f, out_f, r)
    expected_names = {f"{n}.{k}" for n in modules for k in TENSOR_KINDS}
    missing = sorted(expected_names - set(header))
    extra = sorted(set(header) - expected_names)
    if missing:
        raise AdapterFormatError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise AdapterFormatError(
            f"{path}: unexpected tensor(s) {safe_repr(extra[:5])}{' ...' if len(extra) > 5 else ''}"
        )
    spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for rec in modules.values():
        for kind, (dtype, shape) in rec.expected(config.scale_dtype).items():
            name = f"{rec.path}.{kind}"
            entry = header[name]
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise AdapterFormatError(f"{path}: tensor {name}: malformed header entry")
            st_dtype = _ST_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
            if st_dtype != dtype:
                raise AdapterFormatError(
                    f"{path}: tensor {name}: dtype {safe_repr(entry['dtype'])}, expected {_ST_NAMES[dtype]}"
                )
            got = entry["shape"]
            if not (isinstance(got, list) and all(type(d) is int for d in got) and got == list(shape)):
                raise AdapterFormatError(f"{path}: tensor {name}: shape {safe_repr(got)}, expected {list(shape)}")
            offsets = entry["data_offsets"]
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                raise AdapterFormatError(f"{path}: tensor {name}: malformed data_offsets {safe_repr(offsets)}")
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if offsets[1] - offsets[0] != nbytes or offsets[0] < 0:
                raise AdapterFormatError(
                    f"{path}: tensor {name}: byte range {safe_repr(offsets)} holds "
                    f"{safe_repr(offsets[1] - offsets[0])} bytes, expected {nbytes}"
                )
            spans[name] = (dtype, shape, offsets[0], offsets[1])
    end = 0
    for name, (_, _, start, stop) in sorted(spans.items(), key=lambda item: item[1][2:]):
        if start != end:
            raise AdapterFormatError(
                f"{path}: tensor {name}: data does not follow the previous tensor (gap or overlap)"
            )
        end = stop
    if end != data_bytes:
        raise AdapterFormatError(
            f"{path}: the file holds {data_bytes} data bytes but its header describes {end} (truncated or padded)"
        )
    return modules, spans


def _check_module_path(name: str, path: Path) -> None:
    if len(name) > MAX_MODULE_PATH or not _MODULE_PATH_RE.fullmatch(name):
        raise AdapterFormatError(
            f"{path}: module name {safe_repr(name)} is not a module path (dot-separated names of letters, "
            f"digits, '_' and '-', at most {MAX_MODULE_PATH} characters)"
        )
    if any(part in _INTERNAL for part in name.split(".")):
        raise AdapterFormatError(f"{path}: module name {name!r} points inside a LoRDBA layer")


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
