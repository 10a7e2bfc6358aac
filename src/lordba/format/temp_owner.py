"""Whether the writer of a temporary file or folder (:mod:`lordba.format.atomic`) is still at work.

A temporary name holds its writer's process id, but that id means nothing outside the writer's pid namespace: a
folder shared by containers (a bind mount) or by machines (NFS) holds live writers' temporaries whose id is free
here, or another process's. So the writer also holds an exclusive ``flock`` on its temporary (:func:`hold`) until it
is renamed into place: the kernel (or the NFS lock manager) releases it when the writer dies, in whatever
namespace. A temporary is judged left behind (:func:`writer_gone`) only if its id is not a live process here *and*
no one holds that lock. Where a lock cannot be taken at all (no ``fcntl``; a file system without locks on it), only
a temporary untouched for :data:`UNLOCKED_STALE_S` is judged left behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lordba._util import locks

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

UNLOCKED_STALE_S = 24 * 3600  # no lock to ask: a temporary untouched for a day is taken as left behind


def _open(path: Path) -> int:
    flags = (os.O_RDONLY if path.is_dir() else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags)  # a file opened for writing: NFS emulates flock with write locks


def _try_lock(path: Path) -> tuple[int | None, bool | None]:
    """Open ``path`` and ask the writer's exclusive lock on it without waiting: ``(descriptor holding it, False)``,
    ``(None, True)`` where someone holds it, ``(None, None)`` where no lock can be asked there."""
    if fcntl is None:
        return None, None
    try:
        fd = _open(path)
    except OSError:
        return None, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        return None, (True if isinstance(err, BlockingIOError) else None)
    return locks.hold_fd(fd), False


def hold(path: Path) -> int | None:
    """Take the writer's exclusive lock on the temporary ``path`` (a file or folder this process just made); returns
    the descriptor holding it (:func:`release` it once the temporary is renamed into place or removed), or ``None``
    where no lock can be taken there."""
    fd, _ = _try_lock(path)
    try:
        if fd is not None:
            locks.mark_private(fd, True)  # the process's own locks on it (a save into it) do not wait for this one
    except OSError:
        locks.close_held(fd)
        return None
    return fd


def release(fd: int | None) -> None:
    """Let go of a lock :func:`hold` took (``None``, or one a forked child closed at the fork: nothing to do)."""
    if fd is not None and locks.held(fd):
        try:
            locks.mark_private(fd, False)
        finally:
            locks.close_held(fd)


def _locked_by_writer(path: Path) -> bool | None:
    """Whether someone holds the writer's lock on ``path``; ``None`` where this cannot be told."""
    fd, held = _try_lock(path)
    if fd is not None:
        locks.close_held(fd)  # (it was free: taken, and let go at once)
    return held


def writer_gone(path: Path, pid: int) -> bool:
    """Whether the temporary ``path`` named with process id ``pid`` was left by a writer that is gone: ``pid`` is no
    live process here and no one holds the writer's lock on it (where locks cannot be asked, it is a day old)."""
    if _alive(pid):
        return False
    held = _locked_by_writer(path)
    if held is None:
        try:
            return time.time() - path.lstat().st_mtime > UNLOCKED_STALE_S
        except OSError:
            return False
    return not held


_WINDOWS = os.name == "nt"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is known to be a live process here. Never asked on Windows, where ``os.kill(pid, 0)`` does not
    probe: signal 0 is CTRL_C_EVENT there, sent to the process group ``pid`` (the age rule decides instead)."""
    if _WINDOWS:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
