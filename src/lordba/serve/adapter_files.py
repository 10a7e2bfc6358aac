"""What the adapter registry (:mod:`lordba.serve.registry`) reads of an adapter folder without loading it (which
adapters it serves, their sizes and files), and measures of an adapter once loaded."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from lordba._util.files import not_a_directory, open_untrusted
from lordba._util.jsonio import read_json_file
from lordba.config import CONFIG_NAME, PEFT_TYPE, WEIGHTS_NAME, recorded_base_quantization
from lordba.errors import LoRDBAError
from lordba.nn.adapter import held_nbytes
from lordba.nn.saved import SavedModule
from lordba.serve.errors import BadRequestError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,127}")  # an adapter's name: a plain folder name


def served_folder(folder: str | Path | None) -> Path | None:
    """The ``--adapters`` folder, resolved (None without one).

    Raises:
        BadRequestError: it is not a directory, or it is an adapter directory itself rather than a folder of them
            (it served nothing, silently).
    """
    if folder is None:
        return None
    root = Path(folder).resolve()
    if not root.is_dir():
        raise BadRequestError(f"--adapters {not_a_directory(folder)}", param="adapters")
    if (root / CONFIG_NAME).is_file():
        raise BadRequestError(
            f"--adapters {folder}: an adapter directory, not a folder of them: give the folder that holds it "
            f"(each adapter is served by its directory's name, here {root.name!r})",
            param="adapters",
        )
    return root


def in_folder(folder: Path, path: Path) -> bool:
    """Whether ``path`` is an adapter directory that really lies in ``folder`` (links resolved)."""
    return (path / CONFIG_NAME).is_file() and folder in path.resolve().parents


def folder_adapters(folder: Path, seen: dict[Path, tuple] | None = None) -> list[Path]:
    """The adapter directories ``folder`` serves, by name: named as :data:`NAME` allows, inside it (links resolved),
    and not of another adapter type (:func:`other_peft_type`). ``seen``, kept by the caller from one listing to the
    next, holds each directory's config as last read (its inode, size, modification time and type): a config not
    changed since is not read again (``/v1/models`` read a thousand configs per call: 0.2 s). Raises OSError if
    ``folder`` cannot be listed."""
    with os.scandir(folder) as listing:
        entries = sorted((e.name, e.is_symlink()) for e in listing if NAME.fullmatch(e.name))
    found, known = [], {} if seen is None else seen
    for name, link in entries:
        path = folder / name
        try:
            config = os.stat(path / CONFIG_NAME)
        except OSError:  # not a directory, or no config in it
            continue
        if not stat.S_ISREG(config.st_mode) or (link and folder not in path.resolve().parents):
            continue
        stamp = (config.st_ino, config.st_size, config.st_mtime_ns)
        record = known.get(path)
        if record is None or record[:3] != stamp:
            record = known[path] = (*stamp, other_peft_type(path))
        if not record[3]:
            found.append(path)
    names = {name for name, _ in entries}
    for path in list(known):  # forget the directories gone
        if path.parent == folder and path.name not in names:
            known.pop(path, None)
    return found


def payload_bytes(weights: Path) -> int:
    """The tensor bytes of a safetensors file (its size less the header), what the adapter will hold
    once loaded; the file size if the header length is unreadable, 0 if the file cannot be opened as
    an untrusted regular file (the loader refuses such a file: a FIFO there must not block)."""
    try:
        with open_untrusted(weights) as f:
            size = os.fstat(f.fileno()).st_size
            header = int.from_bytes(f.read(8), "little")
    except (OSError, LoRDBAError):
        return 0
    return size - 8 - header if 0 <= header <= size - 8 else size


def files_stamp(path: Path) -> tuple | None:
    """Inode, size and modification time of an adapter directory's config and weights (None if unreadable)."""
    try:
        stats = [os.stat(path / CONFIG_NAME), os.stat(path / WEIGHTS_NAME)]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


def adapter_bytes(model: Any, name: str) -> int:
    """Bytes adapter ``name`` holds on ``model``: its tensors and its inference caches, and its copies of the
    modules it trains in full (``modules_to_save``; what a copy shares with the original counts nothing)."""
    held = held_nbytes(list(model.adapter_modules(name).values()))
    for module in model.modules():
        if isinstance(module, SavedModule) and name in module.lordba_saved:
            original = module.original_module
            shared = {t.untyped_storage().data_ptr() for t in (*original.parameters(), *original.buffers())}
            own = (*module.lordba_saved[name].parameters(), *module.lordba_saved[name].buffers())
            held += sum(t.nbytes for t in own if t.untyped_storage().data_ptr() not in shared)
    return held


def served_base(model: Any) -> dict[str, Any] | None:
    """The base quantization of ``model`` as an adapter records it (``{"backend", "bits", "group_size"}``), None
    for an unquantized base (:func:`~lordba.quant.describe_base` of its layers)."""
    from lordba.quant import describe_base

    return describe_base([m for m in model.modules() if not list(m.children())])


def base_mismatch(path: Path, base: dict[str, Any] | None) -> str | None:
    """How the ``base_quantization`` the adapter directory ``path`` records differs from ``base`` (the served one:
    :func:`served_base`), or None where it records none or the same (or its config cannot be read: the loader then
    says why)."""
    record = recorded_base_quantization(path)
    if record is None or record == base:
        return None
    return f"was trained on a base quantized as {record}, and the served base is {base or 'unquantized'}"


def other_peft_type(path: Path) -> bool:
    """Whether ``path``'s config names another adapter type (a PEFT LoRA, e.g. ``lordba export-lora``'s output
    beside the adapters): not listed; an unreadable config is left to the loader (a request gets its 400)."""
    try:
        peft_type = read_json_file(path / CONFIG_NAME).get("peft_type", PEFT_TYPE)
    except LoRDBAError:
        return False
    return peft_type != PEFT_TYPE
