"""The forms of a :class:`~lordba.nn.model.LoRDBAModel`'s adapters (a mixin of the model): what trains
(``set_trainable``), the inference form (``pack``: packed signs, stored scales, one buffer per adapter), the
training forms (``unpack_to_latent``: latent signs for QAT; ``freeze_signs``: packed signs with float32 scales,
``scales-only``). Each holds the model's lock exclusively (the model's thread-safety contract)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lordba._util.arena import views_of_one_buffer
from lordba._util.dtypes import DTYPES
from lordba._util.state import ordinary_tensors
from lordba.errors import AdapterStateError, ConfigError
from lordba.nn.adapter import LoRDBAAdapter, PackedAdapter, TrainableAdapter
from lordba.nn.adapter_base import SCALES


class AdapterFormsMixin:
    """``set_trainable``, ``pack``, ``unpack_to_latent``, ``freeze_signs`` of :class:`~lordba.nn.model.LoRDBAModel`
    (which provides ``_lock``, ``peft_config``, ``adapter_modules``, ``base_model`` and ``_check_known``)."""

    def set_trainable(self, adapter_name: str, signs: bool = True, scales: bool = True) -> None:
        """Choose what of an adapter trains: latent signs and/or scales, with which its trained biases and modules
        trained in full (``modules_to_save``) train (everything else stays frozen).
        An adapter in inference form whose scales are to train is turned into the training form
        (float32 scale parameters holding its decoded scales, signs frozen). ``signs`` and ``scales`` that are
        not ``True`` / ``False`` are a :class:`ConfigError` (before anything changes)."""
        for name, value in (("signs", signs), ("scales", scales)):
            if type(value) is not bool:
                raise ConfigError(f"set_trainable: {name} must be True or False, got {value!r}")
        with self._lock.write():
            modules = self.adapter_modules(adapter_name)
            if signs and any(isinstance(a, PackedAdapter) for a in modules.values()):
                raise AdapterStateError("packed signs cannot train: call unpack_to_latent() first")
            if scales:
                ste = self.peft_config[adapter_name].ste_spec
                self._convert_forms(adapter_name, lambda a: a.trainable(ste) if isinstance(a, PackedAdapter) else a)
            for adapter in self.adapter_modules(adapter_name).values():
                if isinstance(adapter, TrainableAdapter):
                    adapter.set_trainable(signs, scales)
            self._train_saved(adapter_name, scales)  # modules trained in full train with the scales (as a bias does)

    def _train_saved(self, adapter_name: str, on: bool) -> None:
        """Let the modules ``adapter_name`` trains in full (``modules_to_save``) and its trained biases train, or not
        (the caller holds the write lock)."""
        for _, module in self._saved_modules():
            for name in module.saved_params.get(adapter_name, ()):
                module.lordba_saved[adapter_name].get_parameter(name).requires_grad_(on)

    def pack(self, adapter_name: str | None = None) -> None:
        """Turn adapters (default: all) into the inference form (:class:`~lordba.nn.adapter.PackedAdapter`:
        packed signs and stored scales, frozen; each adapter's tensors in one buffer, as loaded ones are:
        :func:`~lordba.nn.adapter.hold_together`); latents are dropped. Its modules trained in full
        (``modules_to_save``) and trained biases freeze with it. A name that is not a loaded adapter
        (``""`` included) is an :class:`AdapterStateError`, nothing packed."""
        with self._lock.write():
            for name in list(self.peft_config) if adapter_name is None else [adapter_name]:
                self._train_saved(name, False)  # frozen with the adapter, as set_trainable(False) freezes them
                if not any(isinstance(a, TrainableAdapter) for a in self.adapter_modules(name).values()):
                    continue
                self._convert_forms(name, lambda a: a.pack() if isinstance(a, TrainableAdapter) else a)
                hold_together([a for a in self.adapter_modules(name).values() if isinstance(a, PackedAdapter)])

    def _swap(self, adapter_name: str, path: str, adapter: LoRDBAAdapter) -> LoRDBAAdapter:
        """Put ``adapter`` (another form of the one held) at ``path`` under ``adapter_name``; returns it."""
        self._root().get_submodule(path).add_adapter(adapter_name, adapter)
        return adapter

    @ordinary_tensors()  # the new forms' tensors are ordinary ones even under inference mode (version counters)
    def _convert_forms(self, adapter_name: str, convert: Callable[[LoRDBAAdapter], LoRDBAAdapter]) -> None:
        """Replace each module of ``adapter_name`` by ``convert(module)`` where that is another module
        (the caller holds the write lock): ``pack``, ``unpack_to_latent``, ``freeze_signs``."""
        for path, adapter in self.adapter_modules(adapter_name).items():
            converted = convert(adapter)
            if converted is not adapter:
                self._swap(adapter_name, path, converted)

    def unpack_to_latent(self, adapter_name: str, magnitude: float = 0.01) -> None:
        """Turn a packed adapter back into latent form (signs ± ``magnitude``) to resume QAT.

        Raises:
            ConfigError: ``magnitude`` is not a positive finite number (a latent of 0 has the sign +1: every
                sign would be lost).
        """
        number = isinstance(magnitude, (int, float)) and not isinstance(magnitude, bool)
        if not (number and math.isfinite(magnitude) and magnitude > 0):
            raise ConfigError(f"unpack_to_latent: magnitude must be a positive finite number, got {magnitude!r}")
        with self._lock.write():
            self._check_known(adapter_name)
            config = self.peft_config[adapter_name]
            dtype = DTYPES[config.latent_dtype]

            def latent(a: LoRDBAAdapter) -> LoRDBAAdapter:
                if isinstance(a, PackedAdapter):
                    return a.trainable(config.ste_spec, True, magnitude, dtype)
                return a.unfreeze_signs(magnitude, dtype)  # the adapter itself when its signs are latent

            self._convert_forms(adapter_name, latent)

    def freeze_signs(self, adapter_name: str) -> None:
        """Freeze an adapter's signs as packed bits (1 each) and keep its float32 scale parameters:
        the training form of ``scales-only`` (an adapter in inference form is left as it is)."""
        with self._lock.write():
            self._convert_forms(adapter_name, _frozen_signs)


def _frozen_signs(adapter: LoRDBAAdapter) -> LoRDBAAdapter:
    """``adapter`` with its signs frozen (packed), if they are latent; else itself."""
    if isinstance(adapter, TrainableAdapter) and adapter.has_latent_signs:
        return adapter.freeze_signs()
    return adapter


def hold_together(adapters: Sequence[PackedAdapter], huge_page: bool = False) -> None:
    """Hold the tensors of ``adapters`` (one adapter's modules, in model order) as views of one buffer per
    device, each kind's tensors side by side: the layout a loaded file gives (views of its one buffer).
    Decode reads every layer's adapter each token; from separately allocated tensors that cost about a
    point more of q4 decode time at 2 threads (docs/kernels.md). ``huge_page``: a CPU buffer in 2 MB pages
    (:func:`~lordba._util.arena.huge_page_buffer`), a whole page even for a smaller adapter (``AotDecode``'s:
    0.6% off SmolLM2's adapted ``--aot`` step). Values are unchanged."""
    by_device: dict[torch.device, list[PackedAdapter]] = {}
    for adapter in adapters:
        by_device.setdefault(adapter.sign_A.device, []).append(adapter)
    names = ("sign_A", "sign_B", *SCALES)
    for group in by_device.values():
        slots = [(adapter, name) for name in names for adapter in group]
        views = views_of_one_buffer([a._buffers[n] for a, n in slots], huge_pages=huge_page, small_too=huge_page)
        for (adapter, name), view in zip(slots, views):
            adapter.register_buffer(name, view)
