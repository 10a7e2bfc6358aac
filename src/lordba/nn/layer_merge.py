"""Merging a :class:`~lordba.nn.layer.LoRDBALinear`'s adapters into its base weight and taking them out again.

An in-place merge (an unquantized base) adds each update to the weight and records it with the weight's change, so an
interrupt (Ctrl-C) at any point leaves the layer naming what its weights hold; a quantized base is requantized into a
new module, the original kept for :meth:`LayerMergeMixin.unmerge` (exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lordba.errors import AdapterStateError


class LayerMergeMixin:
    """The merge methods of :class:`~lordba.nn.layer.LoRDBALinear` (its ``base_layer``, ``backend``,
    ``lordba_adapters``, ``active_adapters``, ``merged_adapters`` and what unmerge restores)."""

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The dense float32 ``out × in`` update of adapter ``name``."""
        return self.lordba_adapters[name].delta_weight()

    def merge(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False, where: str = "layer"
    ) -> float | None:
        """Add the named (default: active) adapters' updates into the base weight.

        A quantized base is requantized (lossy); its original module is kept, and :meth:`unmerge`
        restores it exactly. With ``safe_merge`` (PEFT's name) the merged weight is checked for
        NaN/Inf before it replaces the base. Returns the largest weight error the requantization
        added beyond the updates (``None`` for an in-place, unquantized merge).

        Raises:
            AdapterStateError: ``safe_merge`` and the merged weight of adapter ``name`` at ``where``
                is not finite (nothing of this layer is changed).
        """
        if safe_merge:
            self.check_finite_merge(adapter_names, where)
        state = self.merge_state()
        try:
            return self._merge(adapter_names, safe_merge, where)
        except BaseException:
            self.restore_merge_state(state)  # the adapters merged before the failing one come out again
            raise

    def _merge(self, adapter_names: Sequence[str] | None, safe_merge: bool, where: str) -> float | None:
        error = None
        for name in self._to_merge(adapter_names):
            delta = self.get_delta_weight(name)
            if self.backend.in_place_merge:
                versions = _versions(self.base_layer)
                try:
                    self.base_layer = self.backend.merge(self.base_layer, delta)
                except BaseException:  # a Ctrl-C as the in-place add returned: the update is in, so recorded
                    if name not in self.merged_adapters and _changed(self.base_layer, versions):
                        self.merged_adapters.append(name)
                    raise
            else:
                expected = self.backend.dequantize(self.base_layer) + delta
                try:
                    merged = self.backend.merge(self.base_layer, delta).train(self.base_layer.training)  # its mode
                except AdapterStateError as err:  # (a requantization the base cannot hold)
                    raise AdapterStateError(f"merging adapter {name!r} into {where}: {err}") from None
                got = self.backend.dequantize(merged)
                if safe_merge and not torch.isfinite(got).all():
                    raise AdapterStateError(f"safe_merge: merging adapter {name!r} into {where} gives NaN/Inf weights")
                error = _worse(error, float((got - expected).abs().max()))
                if not self.merged_adapters:
                    self._premerge_base = [self.base_layer]  # a list: not registered as a submodule
                self.base_layer = merged
            if name not in self.merged_adapters:  # recorded with its weight change: a bias refused or an interrupt
                self.merged_adapters.append(name)  # after this takes the weight's update out (restore_merge_state)
            self._merge_bias(name)
        return error

    def merge_state(self) -> tuple:
        """What :meth:`restore_merge_state` takes this layer's merges back to (the base module, its bias and
        the merge records; references, not copies)."""
        bias = getattr(self.base_layer, "bias", None)
        return self.base_layer, bias, list(self.merged_adapters), list(self._premerge_base), list(self._premerge_bias)

    def restore_merge_state(self, state: tuple) -> None:
        """Take out the adapters merged since :meth:`merge_state` gave ``state``, leaving those merged before
        (a refused merge call undoes only what it did)."""
        base, bias, merged, premerge_base, premerge_bias = state
        if self.backend.in_place_merge:  # the weight changed in place: subtract what was added since
            while len(self.merged_adapters) > len(merged):
                self._unmerge_last()
            if getattr(self.base_layer, "bias", None) is not bias:
                self.base_layer.bias = bias
        else:  # merged modules are new ones: the one held before is as it was
            self.base_layer = base
        self.merged_adapters, self._premerge_base, self._premerge_bias = merged, premerge_base, premerge_bias

    def _merge_bias(self, name: str) -> None:
        """Add adapter ``name``'s trained bias change (``bias="lora_only"/"all"``) to the base bias:
        a new bias tensor, the previous one kept for :meth:`unmerge` (exact)."""
        delta = self.lordba_adapters[name].bias_delta
        bias = getattr(self.base_layer, "bias", None)
        if delta is None or bias is None:
            return
        if not self._premerge_bias:
            self._premerge_bias = [bias]
        merged = (bias.detach().float() + delta.detach().to(bias.device)).to(bias.dtype)
        self.base_layer.bias = nn.Parameter(merged, requires_grad=False)

    def _to_merge(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = adapter_names if adapter_names is not None else self.active_adapters
        # (a name given twice merges once: the merged names record each once, and an unmerge takes out each once)
        return [n for n in dict.fromkeys(names) if n not in self.merged_adapters and n in self.lordba_adapters]

    def check_finite_merge(self, adapter_names: Sequence[str] | None = None, where: str = "layer") -> None:
        """Raise :class:`AdapterStateError` if merging the named (default: active) adapters would
        give NaN/Inf weights (checked before anything changes)."""
        weight = None
        for name in self._to_merge(adapter_names):
            weight = self.backend.dequantize(self.base_layer) if weight is None else weight
            weight = weight + self.get_delta_weight(name)
            if not torch.isfinite(weight).all():
                raise AdapterStateError(f"safe_merge: merging adapter {name!r} into {where} gives NaN/Inf weights")

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again (last merged first). Interrupted (Ctrl-C), the
        layer still names what its weights hold: calling it again finishes."""
        if not self.merged_adapters and not self._premerge_bias:
            return
        if not self.backend.in_place_merge:  # the module held before the first merge (with its own bias) back
            self.base_layer = self._premerge_base[0] if self._premerge_base else self.base_layer
            self.merged_adapters, self._premerge_base, self._premerge_bias = [], [], []
            return
        while self.merged_adapters:
            self._unmerge_last()
        if self._premerge_bias:  # set, then forgotten (interrupted between, a second unmerge sets it again)
            self.base_layer.bias = self._premerge_bias[-1]
            self._premerge_bias.pop()

    def _unmerge_last(self) -> None:
        """Subtract the last merged adapter's update from the weight in place; its name goes when the update
        does (an interrupt before: it stays; as the subtraction returned: the weight's version tells, it goes)."""
        count, versions = len(self.merged_adapters), _versions(self.base_layer)
        try:
            self.base_layer = self.backend.unmerge(self.base_layer, self.get_delta_weight(self.merged_adapters[-1]))
        except BaseException:
            if len(self.merged_adapters) == count and _changed(self.base_layer, versions):
                self.merged_adapters.pop()
            raise
        self.merged_adapters.pop()


def _worse(error: float | None, new: float) -> float:
    """The larger requantization error, NaN if either is (``max`` would drop a NaN: a broken merge looked exact)."""
    if error is None or math.isnan(new):
        return new
    return error if math.isnan(error) else max(error, new)


def _versions(module: nn.Module) -> tuple:
    """What changes when an in-place merge changes ``module``'s tensors: their identities and version counters (an
    inference tensor, made under ``torch.inference_mode``, has none: a copy of it)."""
    return tuple((id(t), t.clone() if torch.is_inference(t) else t._version) for t in module.parameters())


def _changed(module: nn.Module, versions: tuple) -> bool:
    """Whether ``module``'s tensors changed since :func:`_versions` gave ``versions``."""
    now = _versions(module)
    same = (
        i == j and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
        for (i, a), (j, b) in zip(now, versions)
    )
    return len(now) != len(versions) or not all(same)
