"""Adapter files on a :class:`~lordba.nn.model.LoRDBAModel`: save, push, and (from :mod:`lordba.nn.model_load`)
load and hot-swap (a mixin of the model, kept apart so that each module stays readable; it uses the model's lock, names
and layers).

Saving writes a model card (``README.md``) beside the adapter; ``push_to_hub`` uploads the directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lordba._util.files import check_path, windows_name_problem
from lordba.config import LoRDBAConfig
from lordba.errors import AdapterFormatError, ConfigError, LoRDBAError
from lordba.format import adapter as adapter_files
from lordba.format.atomic import ensure_writable_dir
from lordba.nn.adapter import LoRDBAAdapter
from lordba.nn.hub import upload_adapter_folder, write_model_card
from lordba.nn.model_load import AdapterLoadMixin, Targets, _device  # noqa: F401  (re-exported)


class AdapterFilesMixin(AdapterLoadMixin):
    """Save / load / hot-swap methods of :class:`~lordba.nn.model.LoRDBAModel` (load and hot-swap:
    :class:`~lordba.nn.model_load.AdapterLoadMixin`)."""

    def adapter_state(self, adapter_name: str = "default") -> adapter_files.AdapterState:
        """The adapter as stored (config + packed tensors), independent of this model."""
        with self._lock.read():  # a consistent snapshot while other threads hot-swap or switch
            self._check_known(adapter_name)
            config = self._saved_config(adapter_name)
            modules = {
                path: adapter_files.ModuleRecord(path, a.in_features, a.out_features, a.r, a.stored_tensors())
                for path, a in self.adapter_modules(adapter_name).items()
                if not _left_out(config, path, a)
            }
            return adapter_files.AdapterState(config, modules)

    def _saved_config(self, adapter_name: str) -> LoRDBAConfig:
        config = self.peft_config[adapter_name]
        if config.base_model_name_or_path is None:
            name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None)
            if isinstance(name, str) and name:
                config = dataclasses.replace(config, base_model_name_or_path=name)
        return config

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: Sequence[str] | None = None,
        is_main_process: bool = True,
        model_card: bool = True,
        format_version: int | None = None,
        safe_serialization: bool = True,
    ) -> None:
        """Write adapters in the packed format of SPEC §6: ``default`` in ``save_directory``, any
        other adapter in ``save_directory/<name>``, each with a model card (``README.md``, unless
        ``model_card=False`` or the directory has a card lordba did not write). Saves are
        crash-safe and deterministic; the card is written after the adapter's files and never
        changes them. ``format_version``: the file's layout, by default the compact version 3
        (:data:`lordba.config.DEFAULT_FORMAT_VERSION`); 1 writes the per-module layout older
        lordba versions read (version 2 with extra tensors).

        ``safe_serialization`` is PEFT's option: the files are always safetensors (``False`` is refused).

        Every selected adapter is encoded before any is written: one that cannot be saved (e.g. ``int4``
        scales in format version 1) is refused, naming it, and no folder changes.

        ``selected_adapters``: the adapters to write (default: all), a list of names or one name.

        Raises:
            AdapterStateError: an unknown adapter name in ``selected_adapters``.
            AdapterFormatError: an adapter that cannot be saved (named).
            ConfigError: ``safe_serialization=False``.
        """
        if safe_serialization is not True:
            raise ConfigError("lordba writes adapters as safetensors only: safe_serialization must be True")
        check_path(save_directory, "save_pretrained: save_directory")
        if not is_main_process:
            return
        self._save(save_directory, selected_adapters, model_card, format_version)

    def _save(
        self,
        save_directory: str | Path,
        selected_adapters: str | Sequence[str] | None,
        card: bool,
        format_version: int | None,
        repo_id: str | None = None,
        revision: str | None = None,
    ) -> None:
        """:meth:`save_pretrained`'s work: the adapters and their cards (``repo_id`` and ``revision``: the Hub
        repo and branch the cards name) written under the read lock, each card from the config saved beside it; the
        adapters ``selected_adapters`` names (``None``: all) are those held under the lock (another thread may delete
        one meanwhile)."""
        with self._lock.read():
            names = _selected(selected_adapters, self.peft_config)
            self._check_known(*names)
            _check_folder_names(names)
            saves = []  # every adapter's files first: one that cannot be saved leaves all folders as they were
            for name in names:
                state = self.adapter_state(name)
                try:
                    files = adapter_files.adapter_files(state.config, state.modules, state.extras, format_version)
                except AdapterFormatError as err:
                    raise AdapterFormatError(f"save_pretrained: adapter {name!r}: {err}") from None
                saves.append((name, state.config, files))
            folders = [Path(save_directory) if name == "default" else Path(save_directory) / name for name, *_ in saves]
            _make_folders(folders)  # every folder made and checked before any is written: all adapters, or none
            adapter_files.commit_adapters([(directory, files) for (_, _, files), directory in zip(saves, folders)])
            for (name, config, _), directory in zip(saves, folders):
                if card:
                    write_model_card(directory, config, repo_id, None if name == "default" else name, revision)

    def create_or_update_model_card(self, output_dir: str | Path, adapter_name: str = "default") -> None:
        """Write ``adapter_name``'s model card (``README.md``) in ``output_dir``, or update the metadata block of one
        a user wrote there (PEFT's ``create_or_update_model_card``; :func:`~lordba.nn.hub.write_model_card`: a card
        that cannot be read or written only warns).

        Raises:
            AdapterStateError: an unknown adapter name.
        """
        check_path(output_dir, "create_or_update_model_card: output_dir")
        with self._lock.read():
            self._check_known(adapter_name)
            config = self._saved_config(adapter_name)
        write_model_card(output_dir, config, None, None if adapter_name == "default" else adapter_name)

    def push_to_hub(
        self,
        repo_id: str,
        selected_adapters: Sequence[str] | None = None,
        *,
        commit_message: str = "Upload LoRDBA adapter",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload the adapters (the directory :meth:`save_pretrained` writes, model card included)
        to a Hugging Face Hub repo, creating it if needed. Only the adapter is uploaded, never the
        base model.

        Returns:
            ``huggingface_hub``'s ``CommitInfo``.

        Raises:
            AdapterStateError: an unknown adapter name; AdapterFormatError: an invalid ``repo_id``.
        """
        with tempfile.TemporaryDirectory(prefix="lordba-push-") as tmp:  # (_save checks the names, under the lock)
            self._save(tmp, selected_adapters, True, None, repo_id, revision)  # the cards from the uploaded configs
            return upload_adapter_folder(
                tmp,
                repo_id,
                token=token,
                private=private,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )


def _make_folders(folders: list[Path]) -> None:
    """Create (or check) every folder a save writes; if one cannot be made or written, remove those made here."""
    made = [f for f in dict.fromkeys(folders) if not os.path.exists(f)]  # False for a NUL, a name too long: reported
    try:
        for folder in dict.fromkeys(folders):
            ensure_writable_dir(folder)
    except LoRDBAError:
        for folder in reversed(made):
            with contextlib.suppress(OSError, ValueError):  # (ValueError: a NUL character, never made)
                folder.rmdir()
        raise


def _selected(selected_adapters: str | Sequence[str] | None, known: dict[str, Any]) -> list[str]:
    """The adapters a save or an upload names: every one for ``None``, one for a string (not its characters)."""
    if selected_adapters is None:
        return list(known)
    if isinstance(selected_adapters, str):
        return [selected_adapters]
    names = list(selected_adapters) if isinstance(selected_adapters, Iterable) else None  # a generator: read once
    if names is None or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"selected_adapters must be an adapter name or a list of names, got {selected_adapters!r}")
    return list(dict.fromkeys(names))  # a name given twice is saved once (one commit per folder)


def _left_out(config: LoRDBAConfig, path: str, adapter: LoRDBAAdapter) -> bool:
    """A module silenced by a hot-swap from a file that did not have it, and that the swapped-in
    config does not describe: it is not part of that adapter and is not saved with it."""
    described = config.targets_module(path) and config.rank_for(path) == adapter.r
    return not described and not bool(adapter.scale_out.any())


def _check_folder_names(names: Sequence[str]) -> None:
    """Refuse to save an adapter (all but ``default``, saved in the folder itself) into a folder of its name where
    Windows cannot hold that folder (``aux``, ``a:b``: a name an adapter loaded from a Linux folder may keep).

    Raises:
        ConfigError: such a name, naming it.
    """
    for name in names:
        problem = None if name == "default" else windows_name_problem(name)
        if problem is not None:
            raise ConfigError(
                f"save_pretrained: adapter {name!r} would be saved in a folder of its name, which cannot be a folder "
                f"name on Windows ({problem}): load it under another name (load_adapter(..., adapter_name=...)) "
                "and save that one"
            )
