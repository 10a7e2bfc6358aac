"""Cache entries the lab builds once and every later run takes (the llama.cpp bench's GGUFs and tools, the
embedded models): each built under a temporary name of its own and published whole, so that a run that is
interrupted, or two runs building at once, never leave a half-made entry under the name later runs take.

* :func:`cached_file`: a file, built by a callable writing to a path of this build's own, renamed into place;
* :func:`cached_folder`: a folder, the same (a file in it names it finished);
* :func:`move_into_place`: a finished folder renamed to its name, keeping one another build finished meanwhile.

One build of an entry at a time (a lock file beside it): a run that waited takes what the other built. Where the
cache's file system has no locks, builds run at once, each under its own name (:mod:`lordba.format.temp_owner`
marks it live), and the entry is one of them, whole. What a killed build left is removed by the next build, and so
is what the builds of earlier lab releases left in the folder (:func:`remove_old_partials`).
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from lordba._util.locks import locked_file
from lordba.errors import LoRDBAError
from lordba.format import temp_owner
from lordba.format.atomic import TMP_MARK, atomic_write_path, remove_killed_temporaries

OLD_SUFFIX = ".partial"  # what the lab's builds named their work before this module (nothing names it now)


def _lock(out: Path) -> Path:
    """The lock file of the entry ``out`` (beside it, kept)."""
    return out.with_name(f".{out.name}.lock")


def _remove_left_behind(out: Path) -> None:
    """Remove the temporaries of ``out``'s builds whose builder is gone (killed), and the earlier releases' ones in
    its folder that no build can be writing (:func:`remove_old_partials`)."""
    remove_killed_temporaries(out.parent, f"{glob.escape(f'.{out.name}{TMP_MARK}')}*")
    remove_old_partials(out.parent)


def remove_old_partials(folder: Path, builders_locked_out: bool = False) -> list[Path]:
    """Remove the ``*.partial`` files and folders in ``folder``: what builds of earlier lab releases left when they
    were interrupted (they built in one shared ``<entry>.partial`` name, which nothing removed since: a model's is a
    gigabyte). Where ``builders_locked_out`` (the caller holds the lock those builds held: the models folder's for the
    embedded models' installs), each is removed; else only one untouched for a day
    (:data:`lordba.format.temp_owner.UNLOCKED_STALE_S`, as for a temporary whose writer's lock cannot be asked): such a
    build in another process may be writing it, and it held no lock to ask. Returns what was removed."""
    removed = []
    for entry in sorted(folder.glob(f"*{OLD_SUFFIX}")) if folder.is_dir() else []:
        if builders_locked_out or time.time() - _last_touched(entry) > temp_owner.UNLOCKED_STALE_S:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _last_touched(path: Path) -> float:
    """The newest modification time of ``path`` and (a folder) of everything in it; now where one cannot be read
    (removed meanwhile: someone is at work there)."""
    try:
        times = [path.lstat().st_mtime]
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path, onerror=_raise):
                times += [os.lstat(os.path.join(root, name)).st_mtime for name in dirs + files]
    except OSError:
        return time.time()
    return max(times)


def _raise(err: OSError) -> None:
    raise err


def cached_file(out: Path, build: Callable[[Path], None]) -> Path:
    """``out``, built first where it is not there: ``build(tmp)`` writes the entry at ``tmp`` (an empty file of this
    build's own beside ``out``, which the build may overwrite), then it is renamed to ``out``; returns ``out``.

    Raises:
        LoRDBAError: the build left ``tmp`` empty (nothing is cached).
        Exception: what ``build`` raised (nothing is cached).
    """
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked_file(_lock(out)):
        if out.is_file():  # built while this run waited
            return out
        _remove_left_behind(out)
        with atomic_write_path(out, suffix=out.suffix) as tmp:
            build(tmp)
            if tmp.stat().st_size == 0:
                raise LoRDBAError(f"{out.name}: its build wrote nothing; not cached")
    return out


def cached_folder(out: Path, build: Callable[[Path], None], done: str) -> Path:
    """``out``, built first where ``out / done`` is not there: ``build(work)`` fills the empty folder ``work`` of this
    build's own (beside ``out``), which is then renamed to ``out``; returns ``out``. ``done`` names a file the build
    writes (a finished entry has it).

    Raises:
        LoRDBAError: the build did not write ``done`` (nothing is cached).
        Exception: what ``build`` raised (nothing is cached).
    """
    if (out / done).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked_file(_lock(out)):
        if (out / done).is_file():
            return out
        _remove_left_behind(out)
        work = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}")
        work.mkdir()
        owner = temp_owner.hold(work)
        try:
            build(work)
            if not (work / done).is_file():
                raise LoRDBAError(f"{out.name}: its build did not write {done}; not cached")
            move_into_place(work, out, done)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            temp_owner.release(owner)
    return out


def move_into_place(work: Path, out: Path, done: str) -> None:
    """Rename the finished folder ``work`` to ``out``; an ``out`` another build finished meanwhile (it has ``done``)
    is kept (it may be in use), one without ``done`` (an older build's remains) replaced."""
    for attempt in range(2):
        if (out / done).is_file():
            return  # another build finished meanwhile
        try:
            os.rename(work, out)
            return
        except OSError as err:  # out is there (ENOTEMPTY; Windows: EEXIST): built meanwhile, or remains
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt:
                if (out / done).is_file():
                    return
                raise
        shutil.rmtree(out, ignore_errors=True)  # remains without their `done` file
