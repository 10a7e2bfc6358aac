"""Reading, validating and writing the adapter directory of SPEC §6.

Files are untrusted input. Reading goes in this order, and nothing is allocated for tensor data
before the sizes it implies have been checked against the config and the file length:

1. ``adapter_config.json``: size limit, JSON, every field's type and value, format version.
2. Checksum: sha256 of ``lordba_model.safetensors`` (streamed) against the config. If the pair is
   inconsistent but the backups of an interrupted save are consistent, those are read instead.
3. safetensors header: length bound, JSON, metadata (format, version, scale dtype, module
   dims), then every tensor's name, dtype, shape and byte range against the config and metadata.
4. Tensor data (memory-mapped, one tensor at a time): padding bits, finite scales, int8 codes.

Steps 3 and 4, and what the header must describe, are in :mod:`lordba.format.header`.

Writing serialises deterministically (same adapter, same bytes) and commits weights and config
crash-safely (:func:`lordba.format.atomic.commit_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from lordba._util.hashing import file_sha256, stream_sha256
from lordba._util.jsonio import read_json_file, safe_repr
from lordba._version import __version__
from lordba.config import CONFIG_NAME, WEIGHTS_NAME, LoRDBAConfig
from lordba.errors import AdapterFormatError, ConfigError, LoRDBAError
from lordba.format.atomic import backup_path, commit_files
from lordba.format.header import (
    TENSOR_KINDS,
    ModuleRecord,
    check_header,
    check_values,
    lordba_metadata,
    read_header,
    read_tensor,
    stored_shapes,
)
from lordba.format.tensorfile import to_bytes

__all__ = [  # ModuleRecord, TENSOR_KINDS and stored_shapes are defined in lordba.format.header
    "TENSOR_KINDS",
    "AdapterFile",
    "AdapterState",
    "ModuleRecord",
    "open_adapter",
    "read_adapter",
    "serialize",
    "stored_shapes",
    "write_adapter",
]

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_ATTEMPTS = 3


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
                rec.tensors = {k: read_tensor(f, path, f"{rec.path}.{k}", self._spans) for k in TENSOR_KINDS}
        except OSError as err:
            raise AdapterFormatError(f"{path}: cannot read tensors ({err.strerror or err})") from None
        finally:
            f.close()
        for rec in self.modules.values():
            check_values(rec, self.config.scale_dtype, path)

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
        header, metadata, header_len = read_header(f, pair.weights_path, size)
        modules, spans = check_header(header, metadata, pair.config, pair.weights_path, size - 8 - header_len)
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
