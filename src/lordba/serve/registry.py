"""Which adapters the server knows, which are resident on the model, and the LRU that keeps them
within a memory budget.

Adapters come from a folder (``--adapters DIR``: the adapter directory ``DIR/<name>`` serves as
``<name>``, loaded on first use) or from ``POST /v1/load_lora_adapter`` (a ``lora_path`` inside that
folder, loaded at once). A name is a plain folder name (letters, digits, ``_`` and ``-``): it never
resolves outside the folder, symbolic links included. Files are untrusted: the library's loader
validates them fully (:meth:`~lordba.nn.model.LoRDBAModel.load_adapter`), and an adapter that fails
is refused for the requests that name it only.

Requests hold the adapter they use (:meth:`AdapterRegistry.acquire` / :meth:`release`): a held
adapter is never evicted; an unload waits for its last request to finish.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from lordba.config import CONFIG_NAME, WEIGHTS_NAME
from lordba.errors import LoRDBAError
from lordba.nn.layer import BASE_ROW
from lordba.nn.routing import UNUSABLE_NAMES
from lordba.serve import adapter_files as files
from lordba.serve.adapter_files import adapter_bytes, files_stamp, payload_bytes
from lordba.serve.errors import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterMemoryError,
    AdapterTooLargeError,
    ServeError,
    UnavailableError,
    UnknownAdapterError,
)
from lordba.serve.registry_names import AdapterNames, _Entry

log = logging.getLogger("lordba.serve")
THAW_EVERY = 256  # frozen loads between two full collections of the whole heap (~50-300 ms, in the load that runs it)


class RegistryObserver(Protocol):
    """What the registry reports (:class:`lordba.serve.metrics.ServeMetrics` implements it)."""

    def adapter_loaded(self, seconds: float) -> None: ...
    def adapter_load_failed(self) -> None: ...
    def adapter_evicted(self) -> None: ...
    def adapters_resident(self, count: int, nbytes: int) -> None: ...


class AdapterRegistry(AdapterNames):
    """Adapters of one :class:`~lordba.nn.model.LoRDBAModel` by name, with an LRU within
    ``max_bytes`` (None: no limit). ``folder`` is the ``--adapters`` directory (None: only the base
    and nothing to load). Names, and the entry each resolves to: :class:`~lordba.serve.registry_names.AdapterNames`."""

    def __init__(
        self,
        model: Any,
        folder: str | Path | None,
        max_bytes: int | None = None,
        reserved: tuple[str, ...] = (),
        observer: RegistryObserver | None = None,
        allow_base_mismatch: bool = False,
    ) -> None:
        self.model = model
        # an adapter recording another quantized base than the model's is refused, unless allowed (then logged)
        self.base, self.allow_base_mismatch = files.served_base(model), allow_base_mismatch
        # Set by ``freeze_heap(state)`` once the server froze its heap (``gc.freeze``): loaded adapters
        # join the frozen objects, out of every full collection's walk. A flag, not
        # ``gc.get_freeze_count()``, which counts the permanent generation object by object (tens of
        # ms per load once the heap is frozen).
        self.freeze_loads = False
        self.frozen_loads = 0  # loads frozen since freeze_loads was set
        self.folder = files.served_folder(folder)
        self.max_bytes = max_bytes
        self.reserved = frozenset((*reserved, BASE_ROW, *UNUSABLE_NAMES))  # (no adapter can be named these)
        self.observer = observer
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()  # one load / eviction / unload at a time
        self._entries: dict[str, _Entry] = {}  # known names (registered or seen in the folder)
        self._draining: dict[str, _Entry] = {}  # unloaded while requests still hold them
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self.loads = self.evictions = 0
        self._folder_gone = False  # the folder could not be listed last time (said once in the log)
        self._configs_seen: dict[Path, tuple] = {}  # its adapters' configs as last read: not read again unchanged

    # ------------------------------------------------------------------ use
    def acquire(self, name: str) -> None:
        """Hold adapter ``name`` for a request, loading it first if needed (evicting the least
        recently used adapters not in use to stay within ``max_bytes``).

        Raises :class:`UnknownAdapterError` (404), :class:`AdapterLoadError` (bad files, 400),
        :class:`AdapterMemoryError` (no room now, 503), :class:`AdapterTooLargeError` (larger than the whole
        budget, 400), :class:`UnavailableError` (the name's unloaded adapter
        still drains, 503), :class:`BadRequestError` (invalid name)."""
        if self.acquire_resident(name):
            return
        with self._load_lock:
            if self.acquire_resident(name):
                return
            with self._cond:
                entry = self._lookup(name)
            try:
                self._load(name, entry)
            except BaseException:  # a folder's adapter not loaded is found again on next use (kept, see _make_room)
                with self._cond:
                    if entry.from_folder and not entry.resident and self._entries.get(name) is entry:
                        del self._entries[name]
                raise
            with self._cond:
                entry.refs += 1
                entry.used = True

    def release(self, name: str) -> None:
        """A request is done with ``name``; an adapter unloaded meanwhile goes when its last request does."""
        with self._cond:
            entry = self._entries.get(name) or self._draining.get(name)
            if entry is None:
                return
            entry.refs -= 1
            drained = self._draining.get(name) is entry and entry.refs <= 0
        if drained:  # it stays draining (its bytes counted by a load's _make_room) until it is off the model
            with self._load_lock:
                with self._cond:  # a request may have taken it back since: keep it
                    if self._draining.get(name) is not entry or entry.refs > 0:
                        return
                    del self._draining[name]
                self._delete(name, entry)

    def acquire_resident(self, name: str) -> bool:
        """Hold adapter ``name`` for a request if it is resident (True), else hold nothing and load nothing (False):
        the caller then :meth:`acquire` s it where a load may run. Raises as :meth:`acquire` for a name it refuses."""
        with self._cond:
            entry = self._lookup(name)
            if entry.resident:
                entry.refs += 1
                entry.used = True
                self._lru.move_to_end(name)
                return True
        return False

    # ------------------------------------------------------------------ load / unload
    def register(self, name: str, path: str | Path) -> None:
        """``POST /v1/load_lora_adapter``: serve the adapter directory ``path`` (inside the folder) as
        ``name`` and load it now. Raises :class:`AdapterConflictError` if ``name`` is loaded, :class:`UnavailableError`
        (503) while ``name``'s unloaded adapter still drains, :class:`UnknownAdapterError` (404, as vLLM answers) if
        ``path`` holds no adapter directory."""
        self.check_name(name, "lora_name")
        full = self.inside(path)
        with self._load_lock:
            with self._cond:
                current = self._entries.get(name)
                if (
                    current is not None
                    and (current.resident or not current.from_folder)
                    and not self._files_gone(current)
                ):
                    raise AdapterConflictError(f"The lora adapter '{name}' has already been loaded.")
                if name in self._draining:  # unloaded, its requests still running: the model holds one per name
                    raise UnavailableError(
                        f"adapter '{name}' is being unloaded (its requests are still running): retry when they end",
                        param="lora_name",
                    )
                if not _holds_config(full):  # (vLLM's 404 "No adapter found", after its conflict; the path: logged)
                    log.warning("adapter '%s' (%s) cannot be loaded: no %s there", name, full, CONFIG_NAME)
                    raise UnknownAdapterError(
                        f"No adapter found for the lora adapter '{name}': its lora_path holds no adapter directory "
                        f"({CONFIG_NAME})",
                        param="lora_path",
                    )
                entry = self._entries[name] = _Entry(full, from_folder=False)
            try:
                self._load(name, entry, "lora_name")
            except BaseException:  # whatever failed, the name is registered as it was before (or not at all)
                with self._cond:
                    if self._entries.get(name) is entry:
                        del self._entries[name]
                        if current is not None:  # e.g. a registration whose files are gone: still masks the folder's
                            self._entries[name] = current
                raise

    def unload(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``: forget ``name`` (a folder adapter can load again on
        use); it leaves the model now, or when the last request holding it ends."""
        with self._load_lock:
            with self._cond:
                entry = self._entries.get(name) if isinstance(name, str) else None
                if entry is None or (entry.from_folder and not entry.resident):
                    raise UnknownAdapterError(f"The lora adapter '{name}' cannot be found.", param="lora_name")
                del self._entries[name]
                self._lru.pop(name, None)
                if entry.refs > 0:
                    self._draining[name] = entry
                    return
            if entry.resident:
                self._delete(name, entry)

    def _load(self, name: str, entry: _Entry, param: str = "model") -> None:
        """Load ``entry`` onto the model (the load lock is held), making room only once its files passed
        every check of the loader: a corrupt, truncated or mismatched file evicts nobody."""
        self._check_base(name, entry.path, param)
        need = payload_bytes(entry.path / WEIGHTS_NAME)  # at most what it holds: before reading, a too large file
        self._check_fits_budget(name, need, param)  # (its bytes once loaded are checked by _verified)
        if name in self.model.peft_config:  # left by an unload whose last request just ended
            self._delete(name)
        start, entry.stamp = time.perf_counter(), files_stamp(entry.path)
        try:
            self.model.load_adapter(entry.path, name, on_verified=lambda file: self._verified(name, file, param))
        except ServeError:  # no room, or too large (raised by _verified): not the file's fault
            raise
        except (LoRDBAError, OSError) as err:  # OSError: a path the file system refuses (too long, unreadable)
            if self.observer is not None:
                self.observer.adapter_load_failed()
            log.warning("adapter '%s' (%s) cannot be loaded: %s", name, entry.path, err)  # the paths: here only
            detail = str(err).replace(f"{entry.path}{os.sep}", "").replace(str(entry.path), "its directory")
            raise AdapterLoadError(f"adapter '{name}' cannot be loaded: {self.redact(detail)}", param) from None
        seconds = time.perf_counter() - start
        if self.freeze_loads:  # collect first: the cyclic garbage pending now would be frozen, never freed
            self.frozen_loads += 1
            if self.frozen_loads % THAW_EVERY == 0:  # what a load froze alive and died in a cycle since (a request's
                gc.unfreeze()  # connection): freed by this full collection only, once every THAW_EVERY loads
            gc.collect()  # (cheap: it walks only what is not frozen, the new adapter and what came since)
            gc.freeze()
        nbytes = adapter_bytes(self.model, name)
        with self._cond:
            entry.resident, entry.nbytes = True, nbytes
            self._lru[name] = None
            self.loads += 1
        if self.observer is not None:
            self.observer.adapter_loaded(seconds)
        self._report()

    def _check_base(self, name: str, path: Path, param: str) -> None:
        """:class:`AdapterLoadError` (400) naming both bases if adapter ``name`` records another base quantization
        than the served quantized base, unless ``allow_base_mismatch``; allowed (or on an unquantized base), logged."""
        problem = files.base_mismatch(path, self.base)
        if problem and self.base is not None and not self.allow_base_mismatch:
            if self.observer is not None:
                self.observer.adapter_load_failed()
            raise AdapterLoadError(
                f"adapter '{name}' {problem}: its outputs would differ from the ones it was trained for (a server "
                "started with --allow-base-mismatch serves it)",
                param,
            )
        if problem:
            log.warning("adapter '%s' %s: its outputs will differ from the ones it was trained for", name, problem)

    def _check_fits_budget(self, name: str, need: int, param: str) -> None:
        """:class:`AdapterTooLargeError` (400) if ``need`` bytes exceed the whole budget: no eviction and no
        retry can make room (checked from the file's header before it is read)."""
        if self.max_bytes is not None and need > self.max_bytes:
            raise AdapterTooLargeError(
                f"adapter '{name}' ({need} bytes) is larger than the whole adapter memory budget "
                f"(--max-adapter-memory={self.max_bytes} bytes): it can never be loaded on this server",
                param=param,
            )

    def _verified(self, name: str, file: Any, param: str) -> None:
        """The file passed the loader's checks: make room for the bytes its tensors take once loaded (``int4`` scale
        codes, two per byte in the file, are held one per byte: more than the file's payload)."""
        tensors = [*(t for rec in file.modules.values() for t in rec.tensors.values()), *file.extras.values()]
        need = sum(t.nbytes for t in tensors)
        self._check_fits_budget(name, need, param)
        self._make_room(name, need, param)

    def _make_room(self, name: str, need: int, param: str = "model") -> None:
        """Evict least recently used adapters not in use until ``need`` more bytes fit (``need`` is within the
        budget: :meth:`_check_fits_budget`)."""
        if self.max_bytes is None:
            return
        self._measure()
        self._publish()  # the bytes this decision is made on, a 503's included
        with self._cond:
            used = sum(e.nbytes for e in [*self._entries.values(), *self._draining.values()] if e.resident)
            victims = []
            for victim in self._lru:
                if used + need <= self.max_bytes:
                    break
                held = self._entries[victim]
                if held.refs == 0:
                    victims.append(victim)
                    used -= held.nbytes
            if used + need > self.max_bytes:
                raise AdapterMemoryError(
                    f"no room for adapter '{name}' within --max-adapter-memory={self.max_bytes}: every resident "
                    "adapter is in use; retry later",
                    param,
                )
            entries = {v: self._entries[v] for v in victims}
            for victim in victims:
                self._lru.pop(victim)
                entries[victim].resident = False
                if entries[victim].from_folder:  # found again on next use: kept, the entries of every directory
                    del self._entries[victim]  # the folder ever held (removed since) grew without bound
        for victim, entry in entries.items():
            self._delete(victim, entry)
            with self._cond:
                self.evictions += 1
            if self.observer is not None:
                self.observer.adapter_evicted()

    def _delete(self, name: str, entry: _Entry | None = None) -> None:
        """Take ``name`` off the model (the load lock is held)."""
        if name in self.model.peft_config:
            self.model.delete_adapter(name)
        if entry is not None:
            entry.resident, entry.nbytes = False, 0
        self._report()

    def _measure(self) -> None:
        """Size again the resident adapters a request held since they were last sized (the load lock is held): the
        inference caches their forwards built (the ``dense`` kernel mode's folded factors, int8 scales decoded for
        a GPU) are bytes they hold. Only those: sizing one takes milliseconds, and a server holds thousands."""
        with self._cond:
            held = [(n, e) for n, e in (*self._entries.items(), *self._draining.items()) if e.resident and e.used]
        for name, entry in held:
            if name in self.model.peft_config:
                nbytes = adapter_bytes(self.model, name)
                with self._cond:
                    entry.nbytes = nbytes if entry.resident else 0
                    entry.used = entry.refs > 0  # still held: its forwards may build more

    def _report(self) -> None:
        if self.observer is not None:
            self._measure()
            self._publish()

    def _publish(self) -> None:
        """Tell the observer the resident adapters' count and bytes as last measured."""
        if self.observer is not None:
            sizes = self.resident()
            self.observer.adapters_resident(len(sizes), sum(sizes.values()))


def _holds_config(path: Path) -> bool:
    """Whether the directory ``path`` holds an adapter config; True where the file system cannot say (a path too
    long: the loader then refuses it, naming why)."""
    try:
        return (path / CONFIG_NAME).is_file()
    except OSError:
        return True
