"""One writer at a time: an exclusive ``flock`` on a directory, across threads and processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# (device, inode) of the temporaries this process is writing and holds a writer's lock on (format.temp_owner): a
# lock asked on one of them (a save into a temporary folder before its rename) would wait on this process itself
_PRIVATE: set[tuple[int, int]] = set()


def mark_private(fd: int, private: bool) -> None:
    """Note (``private``) or forget the file or folder open as ``fd`` as a temporary this process holds the writer's
    lock on: :func:`locked` and :func:`wait_for_writer` on it never wait (no one else writes into it)."""
    st = os.fstat(fd)
    (_PRIVATE.add if private else _PRIVATE.discard)((st.st_dev, st.st_ino))


def _private(fd: int) -> bool:
    if not _PRIVATE:
        return False
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) in _PRIVATE


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
        if not _private(fd):  # (this process's own temporary: its writer's lock is held here already)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def wait_for_writer(directory: Path) -> bool:
    """Whether a writer holds ``directory``'s lock (:func:`locked`) now; if so, wait until it lets go. A reader
    that found a directory half-written calls it: ``True`` means a save was running (read again), ``False``
    that none is (what it found was left by a save that was interrupted). ``False`` where ``fcntl`` is
    unavailable or the directory cannot be opened."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return False
    try:
        if _private(fd):  # this process is its writer (and the one reading it)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)  # until the writer is done
            return True
    finally:
        os.close(fd)
