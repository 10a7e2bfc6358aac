"""An adapter directory's config and weights file read as one checked pair (steps 1 and 2 of
:mod:`lordba.format.adapter`): the config (size limit, strict JSON, every field), then the weights file (a regular file
of the directory) whose header describes exactly its length, read once into one buffer whose sha256 must be the
config's ``weights_sha256``, and the config's digest in its metadata (:mod:`lordba.format.integrity`). A pair that is
not consistent (:class:`_Inconsistent`) may be an interrupted save's: its backups are read instead where they are.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lordba._util.files import open_untrusted
from lordba._util.jsonio import read_json_file, safe_repr
from lordba.config import CONFIG_NAME, WEIGHTS_NAME, LoRDBAConfig
from lordba.errors import AdapterFormatError, ConfigError, LoRDBAError
from lordba.format.commit import backup_path
from lordba.format.header import read_file_bytes, read_header
from lordba.format.integrity import check_config_digest, check_length

_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _sha_field(raw: dict[str, Any], config_path: Path) -> str:
    sha = raw.get("weights_sha256")
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ConfigError(f"{config_path}: weights_sha256 must be 64 lowercase hex digits, got {safe_repr(sha)}")
    return sha


def _pair_consistent(paths: dict[str, Path]) -> bool:
    try:
        _read_pair(paths[CONFIG_NAME], paths[WEIGHTS_NAME])
    except (LoRDBAError, OSError):
        return False
    return True


class _Inconsistent(AdapterFormatError):
    """The weights file is missing or does not match the config's checksum."""


def _open_verified(path: Path, sha: str) -> tuple[torch.Tensor, _Header]:
    """The bytes of the file at ``path`` (one read) and its header, after checking that the header
    describes the file's length, then that the bytes' sha256 is ``sha``. A file whose header does not
    describe it is refused from the header alone (lordba never leaves such a file, so it is not an
    interrupted save); a checksum mismatch is :class:`_Inconsistent` (an interrupted save's backups
    may be read instead). No digest of the file is ever shown."""
    with open_untrusted(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            try:
                header, metadata, header_len = read_header(f, path, size)
                check_length(header, size - 8 - header_len, path)
            except AdapterFormatError as err:
                raise AdapterFormatError(f"{err} (refused before hashing: checksum mismatch not computed)") from None
            data = read_file_bytes(f, path, size, aligned_at=8 + header_len)  # tensor data aligned
        except OSError as err:
            raise AdapterFormatError(f"{path}: cannot read ({err.strerror or err})") from None
    if hashlib.sha256(data.numpy()).hexdigest() != sha:
        raise _Inconsistent(
            f"{path}: checksum mismatch (its sha256 differs from weights_sha256 in adapter_config.json): the "
            "file is corrupt, truncated or was modified"
        )
    return data, _Header(header, metadata, header_len, size)


@dataclass
class _Header:
    """A weights file's parsed safetensors header, its metadata, its length and the file's size."""

    entries: dict[str, Any]
    metadata: dict[str, str]
    length: int
    size: int


@dataclass
class _Pair:
    """A config and the bytes of the weights file its checksum matches, each read once."""

    config: LoRDBAConfig
    config_path: Path
    weights_path: Path
    sha: str
    data: torch.Tensor
    header: _Header


def _read_pair(config_path: Path, weights_path: Path) -> _Pair:
    raw = read_json_file(config_path)
    config = LoRDBAConfig.from_dict(raw, source=str(config_path))
    sha = _sha_field(raw, config_path)
    version = raw.get("library_version")
    if version is not None and not isinstance(version, str):
        raise ConfigError(f"{config_path}: library_version must be a string, got {safe_repr(version)}")
    if not os.path.lexists(weights_path):
        raise _Inconsistent(f"{weights_path}: missing")
    data, header = _open_verified(weights_path, sha)
    check_config_digest(header.metadata, raw, config_path, weights_path)
    return _Pair(config, config_path, weights_path, sha, data, header)


def _consistent_pair(directory: Path) -> tuple[_Pair, bool]:
    """The current pair, or the intact previous pair an interrupted save left (``recovered``)."""
    try:  # an invalid current config is reported, not papered over by a backup
        return _read_pair(directory / CONFIG_NAME, directory / WEIGHTS_NAME), False
    except _Inconsistent as err:
        failure = err
    backups = [backup_path(directory / name) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    if all(os.path.isfile(p) for p in backups):  # False, not an error, where it cannot look
        try:
            return _read_pair(*backups), True
        except (LoRDBAError, OSError):
            pass
    raise failure


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
