"""One writer at a time: an exclusive ``flock`` on a directory, across threads and processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` itself (created if needed; no lock file is left) for the
    block. Released when the block ends and when the process dies. A no-op where ``fcntl`` is unavailable
    (not POSIX).

    Raises:
        OSError: the directory cannot be created or opened.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
