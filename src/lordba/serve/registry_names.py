"""The adapter registry's names (:class:`~lordba.serve.registry.AdapterRegistry`): which names are valid, which
adapters the ``--adapters`` folder and the registered directories serve, and the entry a name resolves to (a mixin of
the registry, kept apart so that each module stays readable; it uses the registry's lock and entries).

A name is a plain folder name (letters, digits, ``_`` and ``-``): it never resolves outside the folder, symbolic links
included. A client is never shown the server's path of the folder (:meth:`AdapterNames.redact`).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lordba.serve.adapter_files import NAME, files_stamp, folder_adapters, in_folder
from lordba.serve.errors import BadRequestError, UnavailableError, UnknownAdapterError

log = logging.getLogger("lordba.serve")


@dataclass
class _Entry:
    path: Path
    from_folder: bool
    refs: int = 0
    nbytes: int = 0  # resident bytes; 0 while not resident
    resident: bool = False
    used: bool = False  # held by a request since it was last sized: its forwards may have built caches
    stamp: tuple | None = None  # its files at its load (files_stamp): unloaded, it is not taken back if they changed


class AdapterNames:
    """Names and entries of :class:`~lordba.serve.registry.AdapterRegistry` (which sets these attributes)."""

    folder: Path | None  # the --adapters folder, resolved (None: none)
    reserved: frozenset[str]  # names that name no adapter
    _cond: threading.Condition
    _entries: dict[str, _Entry]
    _draining: dict[str, _Entry]
    _lru: OrderedDict[str, None]
    _folder_gone: bool
    _configs_seen: dict[Path, tuple]  # the folder's adapters' configs as last read (folder_adapters)

    def check_name(self, name: str, param: str = "model") -> str:
        """``name`` if it is a valid adapter name, else :class:`BadRequestError` (e.g. ``../x``). A reserved name (the
        base's, the engine's ``__base__`` route) names no adapter: as a request's ``model``, it is not served (404, as
        ``/v1/models`` lists it not); as a name to register, it is refused (400)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequestError(
                f"invalid adapter name {name!r}: use letters, digits, '_' and '-' (a folder name inside --adapters)",
                param=param,
            )
        if name in self.reserved:
            if param == "model":
                raise UnknownAdapterError(f"The model '{name}' does not exist")
            raise BadRequestError(f"invalid adapter name {name!r}: the name is reserved", param=param)
        return name

    def inside(self, path: str | Path, param: str = "lora_path") -> Path:
        """``path`` (absolute, or relative to the folder) resolved, if it lies inside the folder."""
        if self.folder is None:
            raise BadRequestError("this server has no --adapters folder: adapters cannot be loaded", param=param)
        try:
            full = (self.folder / path).resolve()
            if sys.version_info >= (3, 13):  # resolve() stops at a link loop there, where it raised RuntimeError
                _refuse_loop(full)
        except (ValueError, RuntimeError) as err:  # a NUL, a lone surrogate: no path; a link loop (both were a 500)
            raise BadRequestError(f"{param} {str(path)!r} is not a valid path: {self.redact(err)}", param) from None
        if full != self.folder and self.folder not in full.parents:
            raise BadRequestError(f"{param} {str(path)!r} is outside the --adapters folder", param=param)
        return full

    def redact(self, text: object) -> str:
        """``text`` for a client: the server's path of the folder said as ``--adapters`` (the log has it)."""
        return str(text) if self.folder is None else str(text).replace(str(self.folder), "--adapters")

    def names(self) -> list[str]:
        """Every adapter name that can be served: registered ones and those in the folder."""
        found = {d.name for d in self._folder_adapters()}
        with self._cond:  # a folder adapter not resident is listed only while its folder has it
            entries = list(self._entries.items())
        known = {n for n, e in entries if e.resident or not e.from_folder}
        gone = {n for n, e in entries if self._files_gone(e)}  # a request is a 404 (the folder's adapter is masked)
        return sorted((found - self.reserved | known) - gone)

    def _files_gone(self, entry: _Entry) -> bool:
        """Whether ``entry`` is a registered adapter (``load_lora_adapter``), not resident, whose directory holds no
        adapter any more: it cannot be served until registered again."""
        return not entry.resident and not entry.from_folder and not in_folder(self.folder, entry.path)

    def _folder_adapters(self) -> list[Path]:
        """The folder's adapters (:func:`folder_adapters`); none while the folder cannot be listed (deleted or renamed
        while serving: ``/v1/models`` was a 500), said once in the log until it can be again."""
        if self.folder is None:
            return []
        try:
            found = folder_adapters(self.folder, self._configs_seen)
        except OSError as err:
            if not self._folder_gone:
                log.warning("--adapters %s cannot be listed (%s): serving only the adapters loaded", self.folder, err)
            self._folder_gone = True
            return []
        self._folder_gone = False
        return found

    def is_resident(self, name: str) -> bool:
        """Whether adapter ``name`` is on the model now (a request for it loads nothing, unless evicted meanwhile)."""
        with self._cond:
            entry = self._entries.get(name)
            return entry is not None and entry.resident

    def resident(self) -> dict[str, int]:
        """``{name: bytes}`` of the adapters on the model, least recently used first."""
        with self._cond:
            return {n: self._entries[n].nbytes for n in self._lru if n in self._entries} | {
                n: e.nbytes for n, e in self._draining.items() if e.resident
            }

    def _lookup(self, name: str) -> _Entry:
        """The entry of ``name`` (lock held), discovering it in the folder; 404 if unknown, 503 while another
        directory's adapter registered under that name and unloaded still drains (the model holds one per name)."""
        entry = self._entries.get(name)
        if entry is not None and self._files_gone(entry):  # not the folder's adapter of that name in its place
            raise UnknownAdapterError(
                f"The model '{name}' does not exist: its adapter files were removed from the server since it was "
                "registered (load it again with /v1/load_lora_adapter)"
            )
        if entry is not None and (entry.resident or not entry.from_folder or in_folder(self.folder, entry.path)):
            return entry
        if entry is not None:  # a folder adapter not resident whose directory has gone
            del self._entries[name]
        self.check_name(name)
        if self.folder is not None:
            path = self.folder / name
            if in_folder(self.folder, path):
                draining = self._draining.get(name)  # another directory's adapter, or its files changed since loaded
                now = (path.resolve(), files_stamp(path)) if draining is not None else None
                if draining is not None and (draining.path.resolve(), draining.stamp) != now:
                    raise UnavailableError(
                        f"adapter '{name}' is being unloaded (its requests are still running): retry when they end",
                        param="model",
                    )
                if draining is not None:  # the folder's adapter unloaded but still held: a new request takes it back
                    draining.from_folder = True
                    entry = self._entries[name] = self._draining.pop(name)
                    self._lru[name] = None
                    return entry
                entry = self._entries[name] = _Entry(path, from_folder=True)
                return entry
        raise UnknownAdapterError(f"The model '{name}' does not exist")


def _refuse_loop(path: Path) -> None:
    """Raise ``RuntimeError`` as ``Path.resolve`` did before Python 3.13 if ``path`` runs through a link loop
    (3.13 returns the path unresolved from the loop on: its lora_path was a 404 "holds no adapter directory"
    instead of the 400 naming the loop)."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RuntimeError(f"Symlink loop from {str(path)!r}") from None
