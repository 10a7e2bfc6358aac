"""One writer at a time: an exclusive ``flock`` on a directory, across threads and processes."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# (device, inode) of the temporaries this process is writing and holds a writer's lock on (format.temp_owner): a
# lock asked on one of them (a save into a temporary folder before its rename) would wait on this process itself
_PRIVATE: set[tuple[int, int]] = set()
# the descriptors holding this process's locks (locked, wait_for_writer, format.temp_owner.hold): a process forked
# meanwhile (a DataLoader worker started while another thread saves) closes its copies (_after_fork_in_child), which
# would otherwise keep the lock (flock's is the open file's, shared by every copy) until the child exits
_HELD: set[int] = set()


def hold_fd(fd: int) -> int:
    """Note ``fd`` as holding a lock of this process (a forked child closes its copy); returns it."""
    _HELD.add(fd)
    return fd


def held(fd: int) -> bool:
    """Whether ``fd`` holds a lock of this process (:func:`hold_fd`, not yet closed, not a forked child's copy)."""
    return fd in _HELD


def close_held(fd: int) -> bool:
    """Close ``fd`` (noted by :func:`hold_fd`), releasing its lock; ``False`` and nothing closed where it is not held
    here (closed in a child forked while it was held: the number may be another file's since)."""
    if fd not in _HELD:
        return False
    _HELD.discard(fd)
    os.close(fd)
    return True


def _after_fork_in_child() -> None:
    """Close the child's copies of the parent's lock descriptors (closing a copy leaves the parent's lock held)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
    _PRIVATE.clear()  # the child holds no writer's lock on those temporaries


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


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


# flock refused on a directory by its file system: NFS emulates flock with fcntl locks, and an exclusive one needs a
# file open for writing (EBADF; ENOLCK without a lock manager); some FUSE and SMB mounts have none
_NO_LOCKS = {errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``directory`` itself (created if needed; no lock file is left) for the
    block; yields ``True``. Released when the block ends and when the process dies. Where no lock can be held
    (``fcntl`` unavailable: not POSIX; a file system that refuses a directory's lock: NFS), the block runs
    unlocked and ``False`` is yielded.

    Raises:
        OSError: the directory cannot be created or opened.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd = hold_fd(os.open(directory, os.O_RDONLY))
    try:  # (this process's own temporary: its writer's lock is held here already)
        yield _private(fd) or _lock_exclusive(fcntl, fd)
    finally:
        close_held(fd)  # releases the lock


@contextlib.contextmanager
def locked_file(path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if needed and kept; opened for writing, which NFS's
    lock manager locks where it refuses a directory's lock) for the block; yields whether it is held (``False``, the
    block unlocked, where no lock can be taken: not POSIX, a file system with no locks at all).

    Raises:
        OSError: the file cannot be created or opened.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    fd = hold_fd(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666))
    try:
        yield _lock_exclusive(fcntl, fd)
    finally:
        close_held(fd)  # releases the lock


def _lock_exclusive(fcntl: Any, fd: int) -> bool:
    """Take ``fd``'s exclusive ``flock``, waiting for it; ``False`` where its file system refuses locks
    (:data:`_NO_LOCKS`: NFS's directory, a mount with none), any other error raised."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
        return False
    return True


def wait_for_writer(directory: Path) -> bool:
    """Whether a writer holds ``directory``'s lock (:func:`locked`) now; if so, wait until it lets go. A reader
    that found a directory half-written calls it: ``True`` means a save was running (read again), ``False``
    that none is (what it found was left by a save that was interrupted). ``False`` where ``fcntl`` is
    unavailable, the directory cannot be opened or its file system refuses the lock (NFS: EBADF, ENOLCK); ``True``
    without waiting where a writer held it but the wait failed (the reader's own tries are bounded). Never raises
    ``OSError``; what the reader then reads is checked whole either way (its config binds its weights)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        fd = hold_fd(os.open(directory, os.O_RDONLY))
    except OSError:
        return False
    try:
        if _private(fd):  # this process is its writer (and the one reading it)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            pass
        except OSError:  # refused by the file system (NFS): no writer can be told
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # until the writer is done
        except OSError:  # (ENOLCK: no lock record left) a writer was there: the reader reads again all the same
            pass
        return True
    finally:
        close_held(fd)
