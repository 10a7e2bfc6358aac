"""Modules trained in full per adapter (PEFT's ``modules_to_save`` and ``ModulesToSaveWrapper``), and
base biases trained per adapter (``bias="all"`` on modules the adapter does not target).

A :class:`SavedModule` takes the place of the original module in the model and holds, per adapter,
a copy of it whose saved parameters train (all of them for ``modules_to_save``, the ``bias`` only for
a trained bias; the others are shared with the original, not copied). Its forward follows the same
routing as the LoRDBA layers: the active adapter's copy, the original when adapters are disabled,
one copy per row for a mixed batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from lordba.errors import AdapterStateError, ShapeMismatchError
from lordba.nn.routing import BASE_ROW, RoutingGate, current_routing, route_index, row_names


class SavedModule(nn.Module):
    """The original module plus one trained copy per adapter (``lordba_saved[adapter]``)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.lordba_saved = nn.ModuleDict()
        self.saved_params: dict[str, tuple[str, ...]] = {}
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.gate: RoutingGate | None = None

    def add_copy(self, adapter_name: str, params: Sequence[str] | None = None) -> None:
        """A trainable copy for ``adapter_name`` of the parameters named ``params`` (dotted names in the
        module; ``None``: all), sharing the others with the original."""
        names = [n for n, _ in self.original_module.named_parameters()]
        wanted = names if params is None else [n for n in names if n in params]
        if params is not None and len(wanted) != len(params):
            missing = sorted(set(params) - set(names))
            raise ShapeMismatchError(f"{type(self.original_module).__name__} has no parameter(s) {missing}")
        clone = _loaded_copy(self.original_module)
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module = clone.get_submodule(owner) if owner else clone
            if name in wanted:
                getattr(module, leaf).requires_grad_(True)
            elif not self.original_module.get_parameter(name).is_meta:  # (offloaded: the copy keeps its own)
                setattr(module, leaf, self.original_module.get_parameter(name))
        self.lordba_saved[adapter_name] = clone
        self.saved_params[adapter_name] = tuple(wanted)

    def delete_copy(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s copy (if any)."""
        if adapter_name in self.lordba_saved:
            del self.lordba_saved[adapter_name]
            del self.saved_params[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``{parameter name: CPU copy}`` of the saved parameters of ``adapter_name``."""
        clone = self.lordba_saved[adapter_name]
        return {n: clone.get_parameter(n).detach().cpu().clone() for n in self.saved_params[adapter_name]}

    @torch.no_grad()
    def load_saved(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set ``adapter_name``'s saved parameters from ``tensors`` (cast to their dtype)."""
        clone = self.lordba_saved[adapter_name]
        for name, value in tensors.items():
            param = clone.get_parameter(name)
            if tuple(param.shape) != tuple(value.shape):
                raise ShapeMismatchError(f"{name}: shape {tuple(value.shape)}, the module has {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))

    def _selection(self) -> tuple[bool, tuple[str, ...] | None, Sequence[str]]:
        routing = current_routing(self.gate)
        if routing is None:
            return self.disable_adapters, None, self.active_adapters
        active = routing.active if routing.active is not None else self.active_adapters
        return routing.disabled or self.disable_adapters, routing.adapter_names, active

    def __getattr__(self, name: str):
        """An attribute the wrapper lacks is the module's in use (PEFT's ``ModulesToSaveWrapper``): the active
        adapter's copy, or the original (adapters disabled or none with a copy active). Model code reads them
        (Mamba's ``self.lm_head.weight.dtype``, ``get_input_embeddings().weight``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or name.startswith("__"):  # (being built or copied: no recursion)
                raise
        disabled, _, active = self._selection()
        copies = self._modules["lordba_saved"]
        chosen = next((copies[n] for n in active if n in copies), None) if not disabled else None
        return getattr(self._modules["original_module"] if chosen is None else chosen, name)

    def _pick(self, name: str) -> nn.Module:
        return self.lordba_saved[name] if name != BASE_ROW and name in self.lordba_saved else self.original_module

    def forward(self, *args, **kwargs):  # noqa: ANN201
        """The active adapter's copy (the first active one that has a copy), or the original."""
        disabled, names, active = self._selection()
        if disabled:
            return self.original_module(*args, **kwargs)
        if names is not None:
            return self._mixed(names, args, kwargs)
        for name in active:
            if name in self.lordba_saved:
                return self.lordba_saved[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)

    def _mixed(self, names: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor:
        if len(set(names)) == 1:
            return self._pick(names[0])(*args, **kwargs)
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise AdapterStateError("mixed-batch routing through a module trained in full needs a single tensor input")
        x = args[0]
        routing = current_routing(self.gate)
        names = names if routing is None or routing.adapter_names is None else row_names(routing, x.shape[0])
        if len(names) != x.shape[0]:
            raise ShapeMismatchError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} rows")
        out = None
        for name, index in route_index(names, x.device).items():
            part = self._pick(name)(x.index_select(0, index))
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, index, part)
        return out

    def extra_repr(self) -> str:
        return f"adapters={list(self.lordba_saved)}"


def _loaded_copy(original: nn.Module) -> nn.Module:
    """A deep copy of ``original``. Where accelerate offloads its weights (``device_map`` with ``offload_folder``: they
    sit on ``meta`` and each module's hook loads them from its weights map for a call, then drops them), the copy holds
    them, loaded on the device the hook computes on, and has no hook (a copy of the hook reloaded the original
    weights for each call: the copy's own were never used, trained nothing, and could not be saved)."""
    if not any(t.is_meta for t in [*original.parameters(), *original.buffers()]):
        return copy.deepcopy(original)
    hooked = [m for m in original.modules() if "_hf_hook" in m.__dict__]
    memo = {id(m.__dict__["_hf_hook"]): m.__dict__["_hf_hook"] for m in hooked}  # the hooks and their maps: shared
    clone = copy.deepcopy(original, memo)
    for source, module in zip(original.modules(), clone.modules()):
        hook = source.__dict__.get("_hf_hook")
        for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # (a SequentialHook)
            if not getattr(one, "offload", False) or getattr(one, "weights_map", None) is None:
                continue
            recurse = bool(getattr(one, "place_submodules", False))
            for name, tensor in [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]:
                if tensor.is_meta and name in one.weights_map:
                    owner, _, leaf = name.rpartition(".")
                    holder = module.get_submodule(owner) if owner else module
                    value = one.weights_map[name].to(one.execution_device, tensor.dtype, copy=True)
                    if leaf in holder._parameters:
                        holder._parameters[leaf] = nn.Parameter(value, requires_grad=tensor.requires_grad)
                    else:
                        holder._buffers[leaf] = value
        for attr in ("_hf_hook", "_old_forward", "forward"):  # the hook's forward: the class's again
            module.__dict__.pop(attr, None)
    return clone


def embedding_rows(model: nn.Module) -> int | None:
    """The number of token ids ``model``'s input embeddings hold (``get_input_embeddings().num_embeddings``),
    read through a :class:`SavedModule` (``modules_to_save=["embed_tokens"]``: its copies have the original's
    rows); ``None`` when the model does not say."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, SavedModule):
        embedding = embedding.original_module
    rows = getattr(embedding, "num_embeddings", None)
    return rows if isinstance(rows, int) else None
