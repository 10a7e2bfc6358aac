"""Crash-safe writes: a half-written file never replaces a good one.

* :func:`atomic_write_bytes`: temp file in the same directory, fsync, rename, fsync the directory;
  :func:`atomic_write_path` the same for a writer that streams to a path (a large safetensors file).
* :func:`atomic_directory`: build a new output directory under a temporary name and move it into
  place at the end; replacing an existing directory is one atomic exchange on Linux
  (``renameat2(RENAME_EXCHANGE)``), elsewhere two renames. On error nothing is left behind; what
  a killed run leaves is removed by the next run (:func:`remove_killed_temporaries`).
* :func:`link_or_copy`: a hard link, or a copy where the file system has none.

Several files that must stay consistent with each other (an adapter's weights and config) are committed by
:mod:`lordba.format.commit`, on these. Every step was tested by killing a child process just before it
(``tests/format/test_crash_safety.py``).
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
from collections.abc import Iterator
from pathlib import Path

from lordba.errors import LoRDBAError
from lordba.format import temp_owner

TMP_MARK = ".lordba-tmp."


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


_NO_HARD_LINKS = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)
# Windows' reasons, by their own codes (Python gives ERROR_INVALID_FUNCTION, FAT's and exFAT's answer, and
# ERROR_NOT_SUPPORTED the errno EINVAL, which is no reason to copy elsewhere): ERROR_INVALID_FUNCTION,
# ERROR_NOT_SAME_DEVICE, ERROR_NOT_SUPPORTED, ERROR_TOO_MANY_LINKS
_WINDOWS_NO_HARD_LINKS = (1, 17, 50, 1142)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to the new name ``dst``; where the file system has no hard links (FAT, exFAT, SMB, FUSE
    mounts such as a notebook's cloud drive) or refuses this one, an fsynced copy (permissions kept) instead."""
    try:
        os.link(src, dst)
        return
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS and getattr(err, "winerror", None) not in _WINDOWS_NO_HARD_LINKS:
            raise
    try:
        shutil.copy2(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


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
