"""Crash-safe commits of several files that must stay consistent with each other (an adapter's weights and the
config holding their checksum), in one directory or several at once.

Before the first rename, the current files are hard-linked to ``.<name>.lordba-prev`` (copied where the file system
has no hard links: FAT, SMB, some FUSE mounts; :func:`lordba.format.atomic.link_or_copy`); after the last rename the
backups are removed. A save killed between the renames leaves a consistent previous set in the backups, which
:func:`consistent_files` finds (the loader reads them) and the next save restores (by linking or copying, so the
backups stay complete until every file is back). Saves into one directory are serialised by an exclusive ``flock``
on the directory itself (POSIX; no lock file is left). Each new file is written as :mod:`lordba.format.atomic` writes
one (a temporary of the writer's own, fsynced, renamed into place).

Every step was tested by killing a child process just before it (``tests/format/test_crash_safety.py``).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable
from pathlib import Path

from lordba._util.locks import locked
from lordba.errors import LoRDBAError
from lordba.format import temp_owner
from lordba.format.atomic import (
    TMP_MARK,
    _write_temp,
    ensure_writable_dir,
    fsync_dir,
    link_or_copy,
    remove_killed_temporaries,
)

PREV_SUFFIX = ".lordba-prev"


def backup_path(path: Path) -> Path:
    """Where :func:`commit_files` keeps the previous version of ``path`` during a save."""
    return path.with_name(f".{path.name}{PREV_SUFFIX}")


def consistent_files(
    directory: Path, names: list[str], is_consistent: Callable[[dict[str, Path]], bool]
) -> dict[str, Path] | None:
    """Paths of a consistent set of ``names`` in ``directory``: the current files, or the backups
    of an interrupted :func:`commit_files`. ``None`` if neither set is consistent."""
    current = {n: directory / n for n in names}
    if all(p.is_file() for p in current.values()) and is_consistent(current):
        return current
    backups = {n: backup_path(directory / n) for n in names}
    if all(p.is_file() for p in backups.values()) and is_consistent(backups):
        return backups
    return None


def recover(
    directory: Path, names: list[str], is_consistent: Callable[[dict[str, Path]], bool], exclusive: bool = True
) -> None:
    """Finish what an interrupted :func:`commit_files` left: restore a consistent backup set over an
    inconsistent current set, drop backups otherwise, and delete stale temp files: all of them under the
    directory's lock (``exclusive``), else (a file system without directory locks: NFS) only those whose writer is
    gone (:func:`remove_killed_temporaries`), never a running save's."""
    found = consistent_files(directory, names, is_consistent)
    backups = [backup_path(directory / n) for n in names]
    if found is not None and found[names[0]] != directory / names[0]:
        for name in names:  # link, then rename over: the backups stay complete until all are back
            tmp = directory / f".{name}{TMP_MARK}{os.getpid()}.restore"
            tmp.unlink(missing_ok=True)
            link_or_copy(backup_path(directory / name), tmp)
            os.replace(tmp, directory / name)
        fsync_dir(directory)
    for b in backups:
        b.unlink(missing_ok=True)
    for name in names:
        if not exclusive:
            remove_killed_temporaries(directory, f"{glob.escape(f'.{name}{TMP_MARK}')}*")
            continue
        for stale in directory.glob(f".{name}{TMP_MARK}*"):
            stale.unlink(missing_ok=True)
    fsync_dir(directory)


def commit_files(
    directory: str | Path,
    files: dict[str, bytes],
    is_consistent: Callable[[dict[str, Path]], bool],
) -> None:
    """Replace ``files`` (name → bytes, renamed in the given order) in ``directory`` crash-safely."""
    commit_file_sets([(Path(directory), files)], is_consistent)


def commit_file_sets(
    sets: list[tuple[Path, dict[str, bytes]]], is_consistent: Callable[[dict[str, Path]], bool]
) -> None:
    """:func:`commit_files` in several directories at once (a save of several adapters): every new file of every
    directory is written before any is renamed, so that a write that fails (a full disk) leaves all of them as they
    were, not the first ones replaced and the others not. Each directory's lock is held throughout."""
    sets = [(Path(d), files) for d, files in sets]
    seen: dict[tuple[int, int], Path] = {}
    for directory, _ in sets:
        ensure_writable_dir(directory)
        info = directory.stat()
        same = seen.setdefault((info.st_dev, info.st_ino), directory)
        if same != directory:  # a link, a case-insensitive file system: its second lock waited on the first for ever
            raise LoRDBAError(f"{same} and {directory} are one directory: their files would replace each other's")
    at = [sets[0][0]] if sets else [Path()]  # the directory being worked on, for the error
    try:
        with contextlib.ExitStack() as stack:
            held = {}
            for directory in sorted({d for d, _ in sets}):  # one order: two saves never wait for each other
                at[0] = directory
                held[directory] = stack.enter_context(locked(directory))
            for directory, files in sets:
                at[0] = directory
                recover(directory, list(files), is_consistent, held[directory])
            _commit(sets, at)
    except OSError as err:  # a full disk, a read-only file system: the previous files are intact
        raise LoRDBAError(f"{at[0]}: cannot save ({err.strerror or err}); the previous files are intact") from None


def _commit(sets: list[tuple[Path, dict[str, bytes]]], at: list[Path]) -> None:
    temps: dict[Path, Path] = {}  # the final path -> its written temporary file
    owners: list[int | None] = []  # their writer's locks (a save where the directory has no lock: NFS)
    try:
        for directory, files in sets:
            at[0] = directory
            for name, data in files.items():
                temps[directory / name] = _write_temp(directory / name, data)
                owners.append(temp_owner.hold(temps[directory / name]))
        for directory, files in sets:
            at[0] = directory
            for name in files:
                if (directory / name).exists():
                    link_or_copy(directory / name, backup_path(directory / name))
            fsync_dir(directory)
        for directory, files in sets:
            at[0] = directory
            for name in files:
                _rename(temps[directory / name], directory / name)
                del temps[directory / name]  # renamed: nothing left to remove (a failed rename leaves it to `finally`)
            fsync_dir(directory)
        for directory, files in sets:
            for name in files:
                backup_path(directory / name).unlink(missing_ok=True)
            fsync_dir(directory)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for owner in owners:
            temp_owner.release(owner)


def _rename(tmp: Path, path: Path) -> None:
    """``os.replace``; a refusal (Windows: ``path`` open in another program) is a :class:`LoRDBAError` naming it."""
    try:
        os.replace(tmp, path)
    except PermissionError as err:
        raise LoRDBAError(
            f"{path}: cannot replace it ({err.strerror}: it is read-only, or, on Windows, open in another program); "
            "the previous files are intact"
        ) from None
