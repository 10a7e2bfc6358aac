"""Merging a :class:`~lordba.nn.model.LoRDBAModel`'s adapters into its base and taking them out (a mixin of the
model): ``merge_adapter``, ``unmerge_adapter``, ``merge_and_unload``, ``unload``. Each holds the model's lock
exclusively (the model's thread-safety contract); the arithmetic is :mod:`lordba.nn.merge`'s."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lordba._util.modules import replace_submodule
from lordba.errors import AdapterStateError
from lordba.nn.layer import LoRDBALinear
from lordba.nn.merge import merge_layers, merge_names
from lordba.nn.routing import DISABLED
from lordba.nn.structure import replace_everywhere


class MergeMixin:
    """The merge methods of :class:`~lordba.nn.model.LoRDBAModel` (which provides ``_lock``, ``_active``,
    ``peft_config``, ``base_model``, ``_lordba_layers``, ``_layers_disabled``, ``_gate`` and ``_unwrap_saved``)."""

    def merge_adapter(self, adapter_names: str | Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Add the (default: active) adapters into the base weights; forwards then skip them.

        Merging into a quantized base requantizes it: a :class:`~lordba.nn.merge.MergeRequantizationWarning`
        names the error. ``safe_merge`` checks the merged weights for NaN/Inf first (PEFT's option).

        Raises:
            AdapterStateError: an unknown adapter name, a weight offloaded or tied to another module's
                (:func:`~lordba.nn.merge.merge_layers`), ``safe_merge`` found non-finite ones (nothing stays merged),
                or the adapters are disabled (``disable_adapter_layers()``, a ``disable_adapter()`` block of any
                thread): a merged update cannot be turned off, so the block's next forward would fail (nothing is
                merged).
        """
        with self._lock.write():
            names = merge_names(adapter_names, self._active, self.peft_config)
            self._refuse_disabled("merge_adapter")
            merge_layers(self._lordba_layers(), names, safe_merge, self._root())

    def unmerge_adapter(self) -> None:
        """Take merged adapters out of the base weights again."""
        with self._lock.write():
            for _, layer in self._lordba_layers():
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: str | Sequence[str] | None = None
    ) -> nn.Module:
        """Merge the (default: active) adapters into the base and return the plain base model
        (PEFT's signature; ``progressbar`` is accepted and ignored: merging is fast). ``adapter_names=[]`` merges none
        and returns the bare base, as :meth:`unload`. As PEFT's, it merges also while this thread disabled the
        adapters (``disable_adapter_layers()``, or in a ``disable_adapter()`` block: the block's later calls run
        the merged base the call returns).

        Raises:
            AdapterStateError: an unknown adapter name, a weight offloaded or tied to another module's
                (:func:`~lordba.nn.merge.merge_layers`), ``safe_merge`` found non-finite ones, or adapters to merge
                while another thread is in a ``disable_adapter()`` block (its later calls would run the merged
                base): model unchanged.
        """
        with self._lock.write():
            layers = self._lordba_layers()
            names = merge_names(adapter_names, self._active, self.peft_config)
            if names:  # (none merged: nothing to refuse)
                self._refuse_disabled("merge_and_unload", others_only=True)
            merge_layers(layers, names, safe_merge, self._root())
            self._take_out(layers, merge=True)  # modules trained in full: the active adapter's copy
            self.peft_config.clear()
            self._active = ()
        return self.base_model

    def _refuse_disabled(self, what: str, others_only: bool = False) -> None:
        """:class:`AdapterStateError` if the adapters are disabled (``disable_adapter_layers()``, or a
        ``disable_adapter()`` block of any thread, whose calls would then fail or run the merged update); with
        ``others_only``, only by another thread's block (the caller's own disabling is its choice)."""
        own = sum(block.gate is self._gate and block.open for block in DISABLED.get())  # (nested blocks: each)
        if others_only:
            if self._gate._blocks <= own:
                return
            how = "another thread is in a disable_adapter() block"
        elif not (self._layers_disabled or self._gate._blocks):
            return
        else:
            how = "disable_adapter_layers()" if self._layers_disabled else "in a disable_adapter() block"
            if not self._layers_disabled and not own:
                how = "another thread is in a disable_adapter() block"
        raise AdapterStateError(
            f"{what}: the adapters are disabled ({how}) and a merged adapter cannot be; "
            "enable_adapter_layers() (or leave the block) before merging"
        )

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are taken out) and return the base."""
        with self._lock.write():
            layers = self._lordba_layers()
            for _, layer in layers:  # every layer before any is taken out: interrupted, each says what it holds
                layer.unmerge()
            self._take_out(layers, merge=False)  # modules trained in full: the originals
            self.peft_config.clear()
            self._active = ()
        return self.base_model

    def _take_out(self, layers: list[tuple[str, LoRDBALinear]], merge: bool) -> None:
        """Put each layer's base layer and each module trained in full's plain module (:meth:`_unwrap_saved`) in
        its place (the caller holds the write lock): all of them, or none if interrupted (a Ctrl-C half-way left
        a model whose config still named its adapters with some layers' gone)."""
        root, saved, done = self._root(), self._saved_modules(), []
        grads = [(p, p.requires_grad) for _, module in saved for p in module.parameters()]
        try:
            for path, layer in layers:
                replace_everywhere(root, path, layer.base_layer)
                done.append((path, layer))
            self._unwrap_saved(merge)
        except BaseException:
            for path, layer in reversed(done):
                replace_everywhere(root, path, layer)
            for path, module in saved:
                replace_submodule(root, path, module)
            for param, grad in grads:
                param.requires_grad_(grad)
            raise
