"""Opening files of an untrusted directory: regular files only, symbolic links only into the directory.

An adapter directory comes from elsewhere (a download, a shared disk). A name in it that is a FIFO,
a device or a link to ``/proc/self/pagemap`` must not hang a reader, and a link to an arbitrary
file of this machine must not be read (its content or digest could leak into an error message).
:func:`open_untrusted` opens a name only if it is a regular file, following a symbolic link only
when its target lies inside the directory (or, for a snapshot of the Hugging Face cache,
``.../snapshots/<revision>``, inside that repository's ``blobs`` folder, where the hub keeps the
files its snapshot links point to).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from lordba.errors import AdapterFormatError

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def check_path(value: object, what: str) -> None:
    """Refuse ``value`` unless it is a path (``str`` or ``os.PathLike``): an :class:`AdapterFormatError` saying
    ``{what} must be a path, got <type>`` (pathlib's own ``TypeError`` names neither the call nor the argument)."""
    if not isinstance(value, (str, os.PathLike)):
        raise AdapterFormatError(f"{what} must be a path, got {type(value).__name__}")


def not_a_directory(path: Path | str) -> str:
    """``"{path}: not a directory"`` with what is there instead (nothing: a typo or a wrong folder; a file), as the
    errors for a directory argument say it."""
    there = "a file" if os.path.lexists(path) else "nothing is there"  # (lexists: False for a name it cannot stat)
    return f"{path}: not a directory ({there})"


# names Windows keeps for devices, in any case and with any extension (``aux.json`` too), superscript digits included
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"]
)
_WINDOWS_REFUSED = frozenset('<>:"|?*')  # besides / and \: the separators


def windows_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file or folder name on Windows, where a device name (``CON``, ``com1.txt``) opens the
    device, ``a:b`` is the stream ``b`` of the file ``a``, ``<>"|?*`` and control characters are refused and a
    trailing dot or space is dropped; ``None`` where it can. Takes one name, not a path (``/`` and ``\\`` are the
    caller's to refuse)."""
    refused = sorted({c for c in name if c in _WINDOWS_REFUSED or ord(c) < 32})
    if refused:
        return f"it holds {''.join(refused)!r}, which Windows refuses in a file name"
    if name.endswith((".", " ")):
        return "it ends in a dot or a space, which Windows drops from a file name"
    if name.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        return "it is a device name on Windows (CON, PRN, AUX, NUL, COM0-9, LPT0-9; any case, any extension)"
    return None


_HUB_REPOS = ("models--", "datasets--", "spaces--")  # the Hugging Face cache's repository folders: models--ORG--NAME


def link_roots(directory: Path) -> tuple[Path, ...]:
    """The folders a symbolic link inside ``directory`` may point into: the directory itself (resolved)
    and, if it is (inside) a Hugging Face cache snapshot (``models--ORG--NAME/snapshots/<revision>``, beside the
    repository's ``blobs`` folder), that ``blobs`` folder; a folder of another layout that is merely named
    ``snapshots`` gets none. Never raises."""
    real = Path(os.path.realpath(directory))
    for folder in (real, *real.parents):  # a subfolder of a snapshot too
        repo = folder.parent.parent
        if folder.parent.name == "snapshots" and repo.name.startswith(_HUB_REPOS) and (repo / "blobs").is_dir():
            return real, repo / "blobs"
    return (real,)


def open_untrusted(path: Path, missing: str = "missing") -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file.

    A symbolic link is followed only to a target inside :func:`link_roots` of ``path``'s directory;
    the file is opened without following a link in its last component and without blocking (a
    FIFO), then checked to be a regular file. Takes the path and the text naming a missing file;
    returns the open file; raises :class:`AdapterFormatError` naming ``path`` otherwise (missing,
    a link leaving the directory, not a regular file, unreadable). Nothing of the file is read.
    """
    try:
        target = _resolve_link(path)
        fd = os.open(target, _FLAGS)
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: {missing}") from None
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot open ({err.strerror or err})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AdapterFormatError(f"{path}: not a regular file (a directory, FIFO, socket or device is refused)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _resolve_link(path: Path) -> Path:
    """``path``, or the real path of the symbolic link ``path`` if it stays inside the allowed folders."""
    if not stat.S_ISLNK(os.lstat(path).st_mode):
        return path
    real = Path(os.path.realpath(path))
    if not any(real == root or real.is_relative_to(root) for root in link_roots(path.parent)):
        raise AdapterFormatError(
            f"{path}: a symbolic link to a file outside the adapter directory (refused: an adapter's files "
            "must be inside its directory)"
        )
    return real
