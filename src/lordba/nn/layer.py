"""The LoRDBA layer: a frozen base linear layer plus named double-binary adapters (SPEC §1).

The adapters (:mod:`lordba.nn.adapter`) are in training or inference form; the layer adds the
branches of the active ones (stacked adapters add up), or routes each row of a mixed batch to its own
adapter (per-call :class:`~lordba.nn.routing.Routing`, published by the model wrapper for one
forward through its :class:`~lordba.nn.routing.RoutingGate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lordba._util.modules import hook_execution_device
from lordba.errors import AdapterStateError, ShapeMismatchError, TargetModulesError
from lordba.kernels import preload
from lordba.nn.adapter import LoRDBAAdapter
from lordba.nn.epoch import AdapterDict, touch
from lordba.nn.fastpath import ARMED, decode_call, direct_branch, fused_direct, routed_branches
from lordba.nn.layer_merge import LayerMergeMixin
from lordba.nn.routing import BASE_ROW, DISABLED, Routing, RoutingGate, current_routing, route_index, row_names
from lordba.quant import BaseBackend, resolve_backend

__all__ = ["BASE_ROW", "DISABLED", "AdapterDict", "LoRDBALinear", "Routing", "route_index"]  # routing names re-exported


def adapter_device(base_layer: nn.Module, device: torch.device, path: str) -> torch.device:
    """Where an adapter of ``base_layer`` (at ``path``, its weight on ``device``) is made: ``device``, or for a
    weight on ``meta`` the device its accelerate hook computes on (``device_map`` offloading).

    Raises:
        TargetModulesError: the weight is on ``meta`` and no hook loads it (the model was never loaded).
    """
    if device.type != "meta":
        return device
    found = hook_execution_device(base_layer)
    if found is None or found.type == "meta":
        raise TargetModulesError(
            f"module {path!r}: its weights are on the meta device and no accelerate hook loads them "
            "(load the model's weights before adapting it)"
        )
    return found


class LoRDBALinear(LayerMergeMixin, nn.Module):
    """A frozen base linear layer with LoRDBA adapters; a drop-in replacement of the base (its merge methods:
    :class:`~lordba.nn.layer_merge.LayerMergeMixin`)."""

    def __init__(self, base_layer: nn.Module, backend: BaseBackend | None = None) -> None:
        super().__init__()
        backend = backend or resolve_backend(base_layer)
        if backend is None:
            raise ShapeMismatchError(f"{type(base_layer).__name__} is not a supported linear layer")
        backend.adopt(base_layer)  # (bitsandbytes NF4: off the CPU kernel without a backward)
        self.base_layer = base_layer
        self.backend = backend
        self.in_features, self.out_features = backend.features(base_layer)
        preload(backend.weight_device(base_layer))  # the kernels, now: tracing cannot load them
        self.lordba_adapters = AdapterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._premerge_base: list[nn.Module] = []
        self._premerge_bias: list[torch.Tensor] = []  # the base bias before a trained bias was merged
        self.disable_adapters = False
        self.gate = RoutingGate()  # its own; the model's shared one once installed in a LoRDBAModel
        self._prepared: dict = {}  # mixed-batch kernel arguments per batch composition (routed_branches)
        self._direct: list = []  # the one active adapter's kernel arguments (direct_branch)
        self._decode: list = []  # the whole forward as one kept call (decode_call)
        self._fast: object | None = None  # that call, taken again within an armed model call (fastpath.armed)
        self._fast_for: tuple | None = None  # what _fast was made for (decode_call keeps it while that holds)

    def __setattr__(self, name: str, value: object) -> None:
        touch()  # active or disabled adapters, a base layer replaced (merge): kept calls are rebuilt
        if name in ("weight", "bias") and "base_layer" in self._modules:  # the properties: the base layer's
            self._set_base_tensor(name, value)
            return
        if name in ("in_features", "out_features") and self.__dict__.get(name, value) != value:
            raise ShapeMismatchError(  # transformers' resize_token_embeddings sets a tied head's out_features
                f"the {name} of an adapted {type(self.base_layer).__name__} cannot become {value}: its adapters are "
                f"{self.in_features}→{self.out_features} (resize or tie weights before adding adapters)"
            )
        super().__setattr__(name, value)

    def _set_base_tensor(self, name: str, value: object) -> None:
        """``layer.weight = t`` / ``layer.bias = t`` (transformers' ``tie_weights`` ties an output head so) sets
        the base layer's tensor, of the same shape.

        Raises:
            ShapeMismatchError: the base layer has no such tensor, or ``value`` is not one of its shape (a
                resized vocabulary: the adapters were made for the layer's features).
        """
        held = getattr(self.base_layer, name, None)
        if not isinstance(held, torch.Tensor) or not isinstance(value, torch.Tensor) or value.shape != held.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ShapeMismatchError(
                f"the {name} of an adapted {type(self.base_layer).__name__} cannot become {shape}: its adapters "
                f"are {self.in_features}→{self.out_features} (resize or tie weights before adding adapters)"
            )
        setattr(self.base_layer, name, value)

    def _apply(self, fn, recurse: bool = True) -> LoRDBALinear:  # noqa: ANN001
        """``.to()``, ``.cuda()``, ``.half()``, ``to_empty()``: the base layer and bias that :meth:`unmerge`
        restores are converted too (else unmerge put back a base of the old dtype or device); then the kernels
        for the new device, loaded now (as on construction: tracing cannot load them)."""
        result = super()._apply(fn, recurse)
        self._drop_kept_calls()  # they held the tensors from before (a move to a GPU never takes them again)
        if recurse:  # what unmerge restores follows too (held outside the module tree: no state_dict keys)
            for module in self._premerge_base:
                module._apply(fn, recurse)
            for i, bias in enumerate(self._premerge_bias):
                holder = nn.Module()  # the conversion nn.Module applies to its own tensors (set_data, grads)
                if isinstance(bias, nn.Parameter):
                    holder.register_parameter("bias", bias)
                else:
                    holder.register_buffer("bias", bias)
                self._premerge_bias[i] = holder._apply(fn, recurse=False).bias
        preload(self.backend.weight_device(self.base_layer))
        return result

    def __getstate__(self) -> dict:
        """The module's state without its kept calls (``copy.deepcopy``, pickling): they hold the
        original's tensors and base layer (a closure in ``_decode`` / ``_fast``) under keys a copy would
        still match, so a copy would compute with the original's tensors. A copy builds its own."""
        state = super().__getstate__()
        state.update(_prepared={}, _direct=[], _decode=[], _fast=None, _fast_for=None)
        return state

    def _drop_kept_calls(self) -> None:
        """Forget the kept kernel calls (:mod:`lordba.nn.fastpath`) and the tensors they hold; the next call keeps
        its own."""
        self._prepared.clear()
        self._direct.clear()
        self._decode.clear()
        self.__dict__["_fast"] = self.__dict__["_fast_for"] = None

    def get_base_layer(self) -> nn.Module:
        """The wrapped base layer (PEFT's contract)."""
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight if hasattr(self.base_layer, "weight") else self.base_layer.W_q

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, if any."""
        return getattr(self.base_layer, "bias", None)

    @property
    def unmerged_bias(self) -> torch.Tensor | None:
        """The base layer's bias without the trained biases of merged adapters (what a trained bias changes)."""
        return self._premerge_bias[0] if self._premerge_bias else self.bias

    @property
    def merged(self) -> bool:
        """Whether an adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, adapter: LoRDBAAdapter) -> None:
        """Hold ``adapter`` under ``name`` (replacing one of that name, e.g. by its other form)."""
        if (adapter.in_features, adapter.out_features) != (self.in_features, self.out_features):
            raise ShapeMismatchError(
                f"adapter {name!r} is {adapter.in_features}→{adapter.out_features}, "
                f"the layer is {self.in_features}→{self.out_features}"
            )
        self.lordba_adapters[name] = adapter
        touch()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this layer (refused while it is merged)."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged: unmerge it before deleting it")
        if name in self.lordba_adapters:
            del self.lordba_adapters[name]
            self._drop_kept_calls()  # frees the removed adapter's tensors now
            touch()
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` (one name or several, stacked) this layer's active adapters."""
        self.active_adapters = [names] if isinstance(names, str) else list(names)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus the active (or routed) adapters' branches, per the call's :class:`Routing`."""
        if not torch.compiler.is_compiling():  # (a trace never reads _fast: no guard on it)
            fast = self._fast  # decode in a model call: the kept call, where nothing a call can change has (armed)
            if fast is not None and not args and not kwargs:
                y = fast(x, ARMED.token)  # None: something changed, or not a one-token-sized input
                if y is not None:
                    return y
        routing = current_routing(self.gate)
        if not args and not kwargs:  # decode: the kept call (the base and the branch in one op where fused)
            call = decode_call(self, routing, x)
            if call is not None:
                return call(x)
        if routing is None:
            disabled, names, active = self.disable_adapters, None, self.active_adapters
        else:
            disabled, names = routing.disabled or self.disable_adapters, routing.adapter_names
            active = routing.active if routing.active is not None else self.active_adapters
        adapters, merged = self.lordba_adapters, self.merged_adapters
        one = None if disabled or names is not None or len(active) != 1 or merged else adapters._modules.get(active[0])
        if one is not None and not args and not kwargs and torch.compiler.is_compiling():  # one op, traced
            out = fused_direct(self.base_layer, self.backend, one, x)
            if out is not None:
                return out
        result = self.base_layer(x, *args, **kwargs)
        if disabled:
            if merged:
                raise AdapterStateError("adapters are merged into the base: unmerge before disabling them")
            return result
        if names is not None:
            return self._mixed_batch_forward(x, result, row_names(routing, x.shape[0]))
        if len(active) == 1 and not merged and not torch.compiler.is_compiling():  # decode: one kernel call
            if one is None:
                return result
            out = direct_branch(one, x, result, self._direct)
            return out if out is not None else one(x, result)
        for name in active:
            if name in merged or name not in adapters:
                continue  # merged into the base, or this layer is not targeted by that adapter
            result = adapters[name](x, result)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        if self.merged_adapters:
            raise AdapterStateError("mixed-batch routing needs unmerged adapters: call unmerge first")
        if len(names) != x.shape[0]:
            raise ShapeMismatchError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} rows")
        groups = route_index(names, x.device)
        adapters = self.lordba_adapters
        if len(groups) == 1:
            name = names[0]
            return adapters[name](x, result) if name != BASE_ROW and name in adapters else result
        routed = routed_branches(adapters, tuple(names), tuple(groups), x, result, self._prepared)  # one kernel call
        if routed is not None:
            return routed
        result = result.clone()
        for name, index in groups.items():
            if name == BASE_ROW or name not in adapters:
                continue
            delta = adapters[name](x.index_select(0, index))
            result.index_add_(0, index, delta.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lordba_adapters)}"
