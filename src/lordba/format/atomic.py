"""Crash-safe writes: a half-written file never replaces a good one.

* :func:`atomic_write_bytes`: temp file in the same directory, fsync, rename, fsync the directory;
  :func:`atomic_write_path` the same for a writer that streams to a path (a large safetensors file).
* :func:`commit_files`: replace several files that must stay consistent with each other (an
  adapter's weights and the config holding their checksum). Before the first rename, the current
  files are hard-linked to ``.<name>.lordba-prev`` (copied where the file system has no hard links:
  FAT, SMB, some FUSE mounts); after the last rename the backups are removed. A save killed between
  the renames leaves a consistent previous set in the backups, which :func:`consistent_files` finds
  (the loader reads them) and the next save restores (by linking or copying, so the backups stay
  complete until every file is back). Saves into one directory are serialised by an exclusive
  ``flock`` on the directory itself (POSIX; no lock file is left).
* :func:`atomic_directory`: build a new output directory under a temporary name and move it into
  place at the end; replacing an existing directory is one atomic exchange on Linux
  (``renameat2(RENAME_EXCHANGE)``), elsewhere two renames. On error nothing is left behind; what
  a killed run leaves is removed by the next run.

Every step was tested by killing a child process just before it (``tests/test_crash_safety.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from lordba._util.locks import locked
from lordba.errors import LoRDBAError
from lordba.format import temp_owner

TMP_MARK = ".lordba-tmp."
PREV_SUFFIX = ".lordba-prev"


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry change to disk (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes | None, suffix: str = "") -> Path:
    """A new file of this call's own next to ``path`` (created exclusively) holding ``data`` (``None``: empty, for a
    writer that opens it by name), fsynced; removed again if writing fails. Its permissions are those of the file at
    ``path`` where there is one (a private ``0600`` file stays private), else what an ordinary ``open`` gives
    (``0666`` less the umask); set before any byte is written (by name where there is no ``os.fchmod``: Windows
    before Python 3.13)."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}{suffix}")
    mode = _kept_mode(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode) if hasattr(os, "fchmod") else os.chmod(tmp, mode)
            if data is not None:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _kept_mode(path: Path) -> int | None:
    """The permission bits of the regular file at ``path`` (what its replacement keeps); ``None`` where none is."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old or the new content (an ``OSError`` naming
    ``path`` if it cannot be written: a full disk)."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    with _naming(path):
        _replace_with(_write_temp(path, data), path)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An ``OSError`` raised in the block without a file name (a write or fsync that failed: a full disk) is given
    ``path``'s, the output the user named, so that it is reported with the path (the CLI's exit 3, not an internal
    error) rather than as a bare ``[Errno 28] No space left on device``."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_write_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (an empty file of this call's own, its name ending in ``suffix``) for
    a writer that streams to a file name (``safetensors.torch.save_file``: no whole file in memory); when the block
    succeeds, that file is fsynced and renamed over ``path`` and the directory fsynced, so that ``path`` holds either
    the old or the new content. On error the temporary file is removed and ``path`` is untouched.

    Raises :class:`LoRDBAError` where the directory cannot be created or written."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = _write_temp(path, None, suffix)
    owner = temp_owner.hold(tmp)  # marks it live for another namespace's clean-up (remove_killed_temporaries)
    try:
        try:
            with _naming(path):
                yield tmp
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())  # on disk before it has the name: a crash leaves no zeroed file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _replace_with(tmp, path)
    finally:
        temp_owner.release(owner)  # once renamed: never a moment unmarked under its temporary name


def _replace_with(tmp: Path, path: Path) -> None:
    """Rename the written and fsynced ``tmp`` over ``path``, then fsync the directory (``tmp`` removed on error)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


_NO_HARD_LINKS = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to the new name ``dst``; where the file system has no hard links (FAT, exFAT, SMB, FUSE
    mounts such as a notebook's cloud drive) or refuses this one, an fsynced copy (permissions kept) instead."""
    try:
        os.link(src, dst)
        return
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
    try:
        shutil.copy2(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


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


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` (and its parents) if missing; :class:`LoRDBAError` naming it if it cannot be made, is
    not a directory, or is not writable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LoRDBAError(f"{directory}: cannot create the directory ({err.strerror})") from None
    except ValueError:  # a NUL character in the path
        raise LoRDBAError(f"{str(directory)!r}: not a usable path (it holds a NUL character)") from None
    if not directory.is_dir():
        raise LoRDBAError(f"{directory}: exists and is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LoRDBAError(f"{directory}: not writable")


def check_replaceable(out_dir: str | Path, overwrite: bool, keep: tuple[str | Path, ...] = ()) -> Path:
    """The absolute path of an output directory that :func:`atomic_directory` may create or replace.

    Takes the output, whether an existing one may be replaced, and paths that must survive (the
    inputs); returns ``out_dir`` made absolute (``.`` and ``..`` resolved by name; a symbolic link
    is replaced, not its target). Raises :class:`LoRDBAError` for an existing output without
    ``overwrite``, an output that is not a directory, or one whose replacement would delete an input
    or the current directory (it is one of them or one of their parents)."""
    if "\x00" in str(out_dir):
        raise LoRDBAError(f"{str(out_dir)!r}: not a usable path (it holds a NUL character)")
    out = Path(os.path.abspath(out_dir))
    exists = os.path.lexists(out)
    if exists and not overwrite:
        raise LoRDBAError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    if exists and not out.is_dir():
        raise LoRDBAError(f"{out}: exists and is not a directory")
    if out.parent == out:
        raise LoRDBAError(f"{out}: the root directory cannot be an output")
    entry = Path(os.path.realpath(out.parent)) / out.name
    for what, kept in [*((str(k), k) for k in keep), ("the current directory", Path.cwd())]:
        real = Path(os.path.realpath(kept))
        if exists and (real == entry or entry in real.parents):
            raise LoRDBAError(f"{out}: replacing it would delete {what} (it is that directory or one of its parents)")
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False, keep: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block succeeds.

    An existing ``out_dir`` is refused unless ``overwrite``; then it is replaced only after the new
    content is complete, and never if that would delete one of the ``keep`` paths (the inputs) or
    the current directory (:func:`check_replaceable`). On error the temporary directory is removed
    and ``out_dir`` is untouched.
    """
    out = check_replaceable(out_dir, overwrite, keep)
    ensure_writable_dir(out.parent)
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}.{secrets.token_hex(4)}")
    tmp.mkdir()
    owner = temp_owner.hold(tmp)  # marks it live for another namespace's clean-up (remove_killed_temporaries)
    try:
        with _naming(out):
            yield tmp
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        fsync_dir(tmp)
        if os.path.lexists(out) and _exchange(tmp, out):
            fsync_dir(out.parent)
            _remove(tmp)  # now the old content (or the symbolic link that was `out`)
            return
        if os.path.lexists(out):  # no atomic exchange here: two renames (a crash between leaves no `out`)
            old = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}.old.{secrets.token_hex(4)}")
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        temp_owner.release(owner)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where the
    platform, C library or file system cannot."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale(out: Path) -> None:
    """Remove temporary directories that killed runs left next to ``out`` (their process is gone)."""
    remove_killed_temporaries(out.parent, f"{glob.escape(f'.{out.name}{TMP_MARK}')}*")  # a name such as exp[lr=3] too


def remove_killed_temporaries(folder: Path, pattern: str) -> None:
    """Remove the temporary files and directories in ``folder`` whose names match the glob ``pattern`` (names as
    this module makes them: ``TMP_MARK``, then the writing process's id) and whose writer is gone
    (:func:`lordba.format.temp_owner.writer_gone`: its id is no live process here and no one holds its lock): a writer
    killed by a signal it cannot catch (SIGKILL, the out-of-memory killer) left them for good."""
    for stale in folder.glob(pattern) if folder.is_dir() else []:
        pid = stale.name.rsplit(TMP_MARK, 1)[-1].split(".")[0]
        if TMP_MARK in stale.name and pid.isdigit() and temp_owner.writer_gone(stale, int(pid)):
            _remove(stale)


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or symbolic link itself (never what a link points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
