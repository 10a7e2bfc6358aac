"""Adapter files on a :class:`~lordba.nn.model.LoRDBAModel`: save, load, hot-swap (a mixin of the
model, kept apart so that each module stays readable; it uses the model's lock, names and layers).

Loading validates the whole directory (:mod:`lordba.format.adapter`) and checks it against the
model's layers before the model is touched; for inference it builds the adapters' inference form
straight from the stored tensors (:meth:`~lordba.nn.adapter.PackedAdapter.from_stored`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lordba.config import LoRDBAConfig
from lordba.core.scales import get_codec
from lordba.errors import AdapterFormatError, AdapterStateError, ShapeMismatchError
from lordba.format import adapter as adapter_files
from lordba.nn.adapter import LoRDBAAdapter, PackedAdapter, TrainableAdapter


class AdapterFilesMixin:
    """Save / load / hot-swap methods of :class:`~lordba.nn.model.LoRDBAModel`."""

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
        self, save_directory: str | Path, selected_adapters: Sequence[str] | None = None, is_main_process: bool = True
    ) -> None:
        """Write adapters in the packed format of SPEC §6: ``default`` in ``save_directory``, any
        other adapter in ``save_directory/<name>``. Saves are crash-safe and deterministic."""
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        self._check_known(*names)
        with self._lock.read():
            for name in names:
                directory = Path(save_directory) if name == "default" else Path(save_directory) / name
                self.adapter_state(name).save_pretrained(directory)

    def _check_fits(self, state: adapter_files.AdapterState, source: object) -> None:
        """Every module of ``state`` exists in this model with the same in/out features."""
        for path, rec in state.modules.items():
            try:
                base, backend = self._target(path)
                in_f, out_f = backend.features(base)
            except ShapeMismatchError as err:
                raise AdapterFormatError(f"{source}: {err}") from None
            if (in_f, out_f) != (rec.in_features, rec.out_features):
                raise AdapterFormatError(
                    f"{source}: module {path!r} is {rec.in_features}→{rec.out_features} in the file "
                    f"but {in_f}→{out_f} in the base model"
                )

    def _read_for_model(self, model_id: str | Path) -> adapter_files.AdapterFile:
        """Open, check against this model's layers, then load the tensors of an adapter directory."""
        adapter = adapter_files.open_adapter(model_id)
        self._check_fits(adapter, adapter.weights_path)
        adapter.load_tensors()
        return adapter

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Load an adapter directory under ``adapter_name`` (packed form; scales train if
        ``is_trainable``, else it is compact: scales held as stored, frozen). Validation happens
        before the model is touched."""
        self._check_new_name(adapter_name)
        self.load_adapter_state(self._read_for_model(model_id), adapter_name, is_trainable)

    def load_adapter_state(
        self, state: adapter_files.AdapterState, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Add an in-memory adapter (e.g. from ``convert_lora``) under ``adapter_name``, packed form."""
        self._check_new_name(adapter_name)
        self._check_fits(state, "adapter")
        config = state.config
        codec = get_codec(config.scale_dtype)
        adapters = {}
        for path, rec in state.modules.items():
            base, backend = self._target(path)
            adapter = PackedAdapter.from_stored(  # scales held as stored (int8 codes): the file's size in memory
                rec.tensors,
                rec.in_features,
                rec.out_features,
                rec.r,
                config.scaling_for(path),
                codec,
                device=backend.weight_device(base),
            )
            if is_trainable:
                adapter = adapter.trainable(config.ste_spec)
                adapter.set_trainable(signs=False, scales=True)
            adapters[path] = adapter
        with self._lock.write():
            self._check_new_name(adapter_name)  # again: another thread may have taken the name
            self._install(adapter_name, adapters)
            self.peft_config[adapter_name] = config

    def hotswap_adapter(self, model_id: str | Path, adapter_name: str = "default") -> None:
        """Replace a loaded adapter's weights in place (no re-injection, same tensors, so compiled
        graphs stay valid; only a compact adapter given another scale format gets new scale
        buffers). The new adapter must target the same modules (or a subset: the others become
        no-ops) with the same ranks."""
        self._check_known(adapter_name)
        adapter_file = self._read_for_model(model_id)
        config = adapter_file.config
        codec = get_codec(config.scale_dtype)
        with self._lock.write():  # check and swap at once: another thread may delete or swap it
            current = self.adapter_modules(adapter_name)
            for path, rec in adapter_file.modules.items():
                old = current.get(path)
                if old is None or old.r != rec.r:
                    raise AdapterStateError(
                        f"hotswap_adapter: module {path!r} (rank {rec.r}) is not in adapter {adapter_name!r} with "
                        "that rank; hot-swapping needs the same target modules (or a subset) and ranks"
                    )
            for path, adapter in current.items():
                rec = adapter_file.modules.get(path)
                if rec is not None and isinstance(adapter, TrainableAdapter) and adapter.has_latent_signs:
                    adapter = self._swap(adapter_name, path, adapter.freeze_signs())  # stored signs are packed
                adapter.codec = codec
                adapter.scaling = config.scaling_for(path)
                if rec is None:
                    adapter.silence()
                else:
                    adapter.load_stored(rec.tensors)
            self.peft_config[adapter_name] = config

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default", is_trainable: bool = False
    ) -> Any:
        """Load a saved adapter onto ``model`` and activate it."""
        wrapper = cls(model)
        wrapper.load_adapter(model_id, adapter_name, is_trainable=is_trainable)
        wrapper.set_adapter(adapter_name)
        return wrapper


def _left_out(config: LoRDBAConfig, path: str, adapter: LoRDBAAdapter) -> bool:
    """A module silenced by a hot-swap from a file that did not have it, and that the swapped-in
    config does not describe: it is not part of that adapter and is not saved with it."""
    described = config.targets_module(path) and config.rank_for(path) == adapter.r
    return not described and not bool(adapter.scale_out.any())


