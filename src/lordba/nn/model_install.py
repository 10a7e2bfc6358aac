"""Putting an adapter into the model's layers and taking it out, all or none (a mixin of
:class:`~lordba.nn.model.LoRDBAModel`, under :class:`~lordba.nn.model_load.AdapterLoadMixin`; it uses the model's lock,
names and layers): the install and removal the loads, ``add_adapter`` and ``delete_adapter`` share, each undone or
finished on a failure or a Ctrl-C part way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lordba._util.interrupts import PutBack
from lordba.errors import AdapterStateError
from lordba.nn.adapter import LoRDBAAdapter
from lordba.nn.layer import LoRDBALinear
from lordba.nn.structure import replace_everywhere, resolve


class AdapterInstallMixin:
    """Install / remove methods of :class:`~lordba.nn.model.LoRDBAModel` (and ``delete_adapter``)."""

    def _install(self, adapter_name: str, adapters: dict[str, LoRDBAAdapter]) -> None:
        """Put ``adapters`` into their layers (the caller holds the write lock), wrapping plain layers first, each in
        its layer's mode (training or eval: dropout follows the model's). All or none: interrupted (Ctrl-C), the
        layers done lose the adapter again and those wrapped for it get their base back (else an adapter the model
        does not name stayed in them, and ``from_pretrained`` repeated refused the user's model as adapted)."""
        root, done = self._root(), []
        try:
            for path, adapter in adapters.items():
                module = resolve(root, path)
                if not isinstance(module, LoRDBALinear):
                    wrapper = LoRDBALinear(module)
                    wrapper.gate = self._gate
                    wrapper.disable_adapters = self._layers_disabled
                    wrapper.train(module.training)
                    done.append((path, wrapper))  # (before it is placed: taking back a wrapper not placed is no-op)
                    replace_everywhere(root, path, wrapper)
                    module = wrapper
                    module.set_adapter(self._active)
                else:
                    done.append((path, module))
                if adapter.training != module.training:
                    adapter.train(module.training)
                module.add_adapter(adapter_name, adapter)
        except BaseException:
            for path, module in reversed(done):
                if adapter_name in module.lordba_adapters:
                    del module.lordba_adapters[adapter_name]
                if not module.lordba_adapters:
                    replace_everywhere(root, path, module.base_layer)
            raise

    def _take_from_layers(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer, layers left without adapters unwrapped: all or none (a Ctrl-C
        half-way put back, else the model kept naming an adapter some of its layers had lost)."""
        root, done = self._root(), []
        try:
            for path, layer in self._lordba_layers():
                adapter = layer.lordba_adapters[adapter_name] if adapter_name in layer.lordba_adapters else None
                done.append((path, layer, adapter, list(layer.active_adapters), list(layer.lordba_adapters)))
                layer.delete_adapter(adapter_name)
                if not layer.lordba_adapters:
                    replace_everywhere(root, path, layer.base_layer)
        except BaseException:
            for path, layer, adapter, active, order in reversed(done):
                if adapter is not None and adapter_name not in layer.lordba_adapters:
                    layer.add_adapter(adapter_name, adapter)
                held = layer.lordba_adapters._modules
                for name in order:  # in their order again (a stack's sum adds them in it)
                    held[name] = held.pop(name)
                layer.active_adapters = active
                replace_everywhere(root, path, layer)
            raise

    def _add_whole(self, adapter_name: str, config: Any, adapters: dict[str, Any], extras: Callable[[], None]) -> None:
        """Install ``adapters``, then ``extras()`` (trained biases, modules trained in full), then name the adapter
        (the caller holds the write lock and checked the name): all or none. Failing or interrupted (Ctrl-C) half-way,
        the adapter is taken out of every layer and module again, repeated until done on a second Ctrl-C (raised
        after; else the model named an adapter without its trained biases and head, or layers held one it did not
        name)."""
        drop = PutBack(self._drop_whole, [adapter_name])
        try:
            self.__dict__["_adding"] = (adapter_name,)  # (the instance's dict: nn.Module.__setattr__ is Python code)
            self._install(adapter_name, adapters)
            extras()
            self.peft_config[adapter_name] = config  # last: a name the model holds is a whole adapter
        except BaseException:
            try:  # (a first try apart: a Ctrl-C pending as it begins is caught here, a second one at the next try)
                drop()
            except KeyboardInterrupt as err:
                drop.interrupted = err
                while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                    try:
                        drop()
                        break
                    except KeyboardInterrupt as err:
                        drop.interrupted = err
            drop.done()  # (a Ctrl-C that came meanwhile raised)
            raise
        finally:
            self.__dict__["_adding"] = ()

    def _drop_whole(self, adapter_name: str) -> None:
        """Take ``adapter_name`` out of every layer, of the names and active adapters, and its trained copies of
        modules out (the caller holds the write lock; each step can be repeated, so a Ctrl-C part way is handled by
        calling it again)."""
        self.__dict__["_adding"] = ()
        self._take_from_layers(adapter_name)
        self.peft_config.pop(adapter_name, None)
        self._active = tuple(n for n in self._active if n != adapter_name)
        self._sync_saved()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer; layers left without adapters get their base back. Interrupted (Ctrl-C)
        before every layer gave it up, it is kept whole; after, the delete is finished before the interrupt is raised
        (a second Ctrl-C while it is finished: raised once it is).

        Raises:
            AdapterStateError: an unknown adapter, or one merged into the base (nothing changes).
        """
        with self._lock.write():
            self._check_known(adapter_name)
            if any(adapter_name in layer.merged_adapters for _, layer in self._lordba_layers()):  # before any change
                raise AdapterStateError(f"adapter {adapter_name!r} is merged: unmerge it before deleting it")
            finish = PutBack(self._finish_delete, [adapter_name])
            try:
                self._drop_whole(adapter_name)  # its layers first, all or none
            except BaseException:  # interrupted (Ctrl-C): once the layers gave it up, finished (not half-deleted)
                try:  # (a first try apart: a Ctrl-C pending as it begins is caught here, a second one at the next try)
                    finish()
                except KeyboardInterrupt as err:
                    finish.interrupted = err
                    while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                        try:
                            finish()
                            break
                        except KeyboardInterrupt as err:
                            finish.interrupted = err
                finish.done()  # (a Ctrl-C that came meanwhile raised)
                raise

    def _finish_delete(self, adapter_name: str) -> None:
        """Finish an interrupted delete once every layer gave the adapter up (else it is kept whole)."""
        if not any(adapter_name in layer.lordba_adapters for _, layer in self._lordba_layers()):
            self._drop_whole(adapter_name)
