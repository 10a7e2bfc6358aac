"""sha256 of files, streamed (adapter checksums, verified downloads)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f: BinaryIO) -> str:
    """sha256 (hex) of the whole open binary file ``f``, read from its start in 1 MiB chunks;
    ``OSError`` if it cannot be read."""
    h = hashlib.sha256()
    f.seek(0)
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()
