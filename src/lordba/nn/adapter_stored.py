"""How the inference form (:class:`~lordba.nn.adapter.PackedAdapter`) keeps its buffers as stored: set in place from
validated stored tensors (a hot-swap: compiled graphs stay valid), silenced, pickled with storages of their own, and
moved by ``.to()`` / ``.half()`` with the scales in their stored dtypes (a mixin of the adapter, kept apart so that
each module stays readable)."""

from __future__ import annotations

import torch
from torch import nn

from lordba._util.arena import own_storages
from lordba.nn.adapter_base import SCALES, check_sizes


class StoredBuffers:
    """:class:`~lordba.nn.adapter.PackedAdapter`'s stored buffers (``sign_A``, ``sign_B``, the scales) kept as
    stored."""

    @torch.no_grad()
    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set this adapter from validated stored tensors, in place (what a hot-swap does: compiled
        graphs stay valid); a scale tensor of another dtype (the scale format changed) gets a new buffer."""
        check_sizes(self, tensors)
        self.sign_A.copy_(tensors["sign_A"])
        self.sign_B.copy_(tensors["sign_B"])
        for name in SCALES:
            self._hold(name, tensors[name])

    def _hold(self, name: str, value: torch.Tensor) -> None:
        held = self._buffers[name]
        if held.dtype == value.dtype and held.shape == value.shape:
            held.copy_(value)
        else:
            self.register_buffer(name, value.to(held.device).clone(memory_format=torch.contiguous_format))

    @torch.no_grad()
    def silence(self) -> None:
        """Make the branch a no-op (``a = 0``) in the adapter's scale format (what a hot-swap does to
        modules the new file leaves out)."""
        device = self.scale_in.device
        ones = torch.ones(self.in_features + self.r, device=device)
        stored = self.codec.encode(ones[: self.in_features], ones[self.in_features :], torch.zeros(self.out_features))
        for name, value in zip(SCALES, stored):
            self._hold(name, value.to(device))

    def __getstate__(self) -> dict:
        """The module's state (``torch.save`` of a model, ``copy.deepcopy``) with its tensors in storages of their
        own: a loaded or packed adapter's are views of one buffer of several dtypes, which ``torch.save`` refuses."""
        state = super().__getstate__()
        state["_buffers"] = own_storages(state["_buffers"])
        return state

    def _apply(self, fn, recurse: bool = True) -> nn.Module:  # noqa: ANN001
        """``.to()``, ``.half()``, …: the scales follow the device but keep their stored dtypes (they
        are the file's tensors; casting them would change what is saved and what runs): taken back only where
        the conversion cast them (``to_empty()`` of an adapter on ``meta`` cannot copy them)."""
        held = {name: self._buffers[name] for name in SCALES}
        result = super()._apply(fn, recurse)
        for name, tensor in held.items():
            converted = self._buffers[name]
            if converted.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(converted.device)
        self._caches.clear()
        return result
