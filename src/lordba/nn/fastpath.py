"""The inference hot path's kernel calls, with their arguments kept between tokens.

Decode runs every adapted layer once per token, and the Python around a kernel call costs as much
as the kernel. A layer therefore keeps its next call: :func:`decode_call` for one active adapter
with gradients off (the layer's whole forward: the base layer and the branch in one op where the
base has a fused one), :func:`direct_branch` for the branch alone (gradients on, an input that needs
none), :func:`routed_branches` for a mixed batch (one call for all its adapters, S-LoRA's adapter
table built lazily per batch composition). What is kept is only ever the modules' own tensors, read
where they are held (in-place changes are seen), and it is dropped whenever an adapter or the layer
is changed (:func:`lordba.nn.epoch.touch`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from lordba import kernels
from lordba.nn.adapter_base import AdapterBase
from lordba.nn.epoch import _EPOCH, _OPTIMIZER_STEPS
from lordba.quant import BaseBackend


def direct_branch(adapter: AdapterBase, x: torch.Tensor, base: torch.Tensor, kept: list) -> torch.Tensor | None:
    """``base`` plus ``adapter``'s branch by one call of the CPU op with the arguments kept in
    ``kept`` (the calling layer's one-entry cache: decode runs this once per layer and token, and
    the adapter's Python path costs as much as the kernel). Returns ``None`` where the adapter's own
    call is needed (not the inference form, hooks on it, a gradient, another device or mode); the
    entry is rebuilt whenever an adapter changes (:func:`touch`)."""
    if torch.is_grad_enabled() and (x.requires_grad or base.requires_grad):
        return None
    if _hooked(adapter):  # checked on every call: a hook set after the call was kept does not touch()
        return None
    key = (adapter, x.dtype, base.dtype, x.device, kernels.get_mode(), _EPOCH[0], _OPTIMIZER_STEPS[0])
    call = _kept(kept, key, _direct_call, adapter, x, base)
    if call is None:
        return None
    op, tensors, scaling, limit = call
    return op(x, *tensors, scaling, limit, base)


def _kept(kept: list, key: tuple, build: Callable[..., tuple | None], *args: object) -> tuple | None:
    """The call kept in the one-entry cache ``kept`` (``[key, call]``) for ``key``, rebuilt by
    ``build(*args)`` when the key changed (an adapter, dtype, device, kernel mode, or any adapter's epoch
    or optimizer step). Key and call are read together and replaced together (each one list operation
    under the GIL), so a thread never pairs one call's key with another's call."""
    found = kept[:]
    if found and found[0] == key:
        return found[1]
    call = build(*args)
    kept[:] = [key, call]
    return call


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook would run around one of ``modules`` (theirs or a global one): a direct
    kernel call would skip it."""
    if _global_forward_hooks or _global_forward_pre_hooks:
        return True
    return any(module._forward_hooks or module._forward_pre_hooks for module in modules)


def _direct_call(adapter: AdapterBase, x: torch.Tensor, base: torch.Tensor) -> tuple | None:
    if not adapter._routed_as_stored:
        return None
    op = kernels.cpu_branch_op(x, base)
    found = adapter._routed(False, (kernels.get_mode(), x.dtype)) if op is not None else None
    return None if found is None else (op, *found)


class _Armed(threading.local):
    token: tuple | None = None  # this thread's model call's state, where its layers may take their kept call


ARMED = _Armed()
_LAST_TOKEN: list = [None]


def decode_call(layer: nn.Module, routing: object, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The whole forward of ``layer`` (a :class:`~lordba.nn.layer.LoRDBALinear`) for ``x`` as one kept
    callable, where it is its base layer plus one active inference-form adapter's kernel call with
    gradients off (decode, generation, serving one adapter), else ``None`` (the layer's ordinary path).

    On a base with a fused op (q4: ``lordba::q4_branch``; ``nn.Linear`` and HQQ: ``lordba::linear_branch``)
    the call is that op alone, the two calls' result up to float rounding
    (:meth:`~lordba.quant.BaseBackend.fused_branch`); else the base layer's ``forward`` and then the
    branch op adding into its output. It is kept in ``layer._decode``
    for the call's ``routing`` (the :class:`~lordba.nn.routing.Routing` in force, interned), ``x``'s
    dtype and whether it is on the CPU, the kernel mode and the adapters' epoch (:func:`touch`: any change to an adapter
    or to the layer's attributes) and optimizer steps; hooks are checked on every call (a direct call
    would skip them). Within an armed model call the call is also kept in ``layer._fast`` (:func:`armed`)."""
    if _global_forward_hooks or _global_forward_pre_hooks or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    epoch = _EPOCH[0]
    key = (routing, x.dtype, x.is_cpu, kernels.get_mode(), epoch, _OPTIMIZER_STEPS[0])  # only CPU has calls
    entry = _kept(layer._decode, key, _decode_entry, layer, routing, x)
    if entry is None or layer.merged_adapters:
        return None
    call, hook_dicts, native = entry
    if any(hook_dicts):
        return None
    token, state = ARMED.token, layer.__dict__  # (set in the layer's __dict__: its __setattr__ would touch())
    if token is None or token[0] is not routing:
        state["_fast"] = state["_fast_for"] = None
        return call
    made = state.get("_fast_for")  # a prompt the kept call declines comes here: the same one is kept for it
    if made is None or made[0] is not token or made[1] is not x.dtype or made[2] != epoch or made[3] is not entry:
        state["_fast"] = _layer_call((token, _EPOCH, epoch, x.dtype, hook_dicts), call, native)
        state["_fast_for"] = (token, x.dtype, epoch, entry)
    return call


def _layer_call(checks: tuple, call: Callable, native: tuple | None) -> Callable:
    """The kept call as the layer takes it again within armed model calls: ``f(x, token)``, ``call(x)`` where
    ``checks`` (the model call's token, the epoch list and value, the input's dtype, the hook dicts) still hold,
    else ``None``. A bound call of the base's fused op where the backend has one
    (:meth:`~lordba.quant.BaseBackend.bound_branch`, ``native``: ``(backend, base layer, tensors, scaling,
    limit)``; prompts that take kept factors through ``call``), else ``call`` behind the same checks, in C++
    where the bound calls load, else in Python."""
    module = kernels.bound_calls()
    if module is None:
        return _CheckedCall(checks, call)
    bound = None if native is None else native[0].bound_branch(*native[1:], checks, call)
    return bound if bound is not None else module.LayerCall.python(checks, call)


class _CheckedCall:
    """:func:`_layer_call`'s checks in Python (where the bound calls are unavailable)."""

    __slots__ = ("call", "dtype", "epoch", "hooks", "token")

    def __init__(self, checks: tuple, call: Callable) -> None:
        self.token, _, self.epoch, self.dtype, self.hooks = checks
        self.call = call

    def __call__(self, x: torch.Tensor, token: tuple | None) -> torch.Tensor | None:
        if token is not self.token or _EPOCH[0] != self.epoch or torch.is_grad_enabled() or x.dtype is not self.dtype:
            return None
        return None if any(self.hooks) else self.call(x)


def _decode_entry(layer: nn.Module, routing: object, x: torch.Tensor) -> tuple | None:
    """``(call, [the base layer's and the adapter's forward hook and pre-hook dicts], native)`` for
    :func:`decode_call` (``native``: ``(backend, base layer, tensors, scaling, limit)`` where ``call`` is the
    backend's fused op, for :meth:`~lordba.quant.BaseBackend.bound_branch`), or ``None``."""
    if routing is None:
        disabled, names, active = layer.disable_adapters, None, layer.active_adapters
    else:
        disabled, names = routing.disabled or layer.disable_adapters, routing.adapter_names
        active = routing.active if routing.active is not None else layer.active_adapters
    if disabled or names is not None or len(active) != 1 or layer.merged_adapters:
        return None
    adapter = layer.lordba_adapters._modules.get(active[0])
    op = kernels.cpu_branch_op(x, x)
    if adapter is None or op is None or not adapter._routed_as_stored:
        return None
    found = adapter._routed(False, (kernels.get_mode(), x.dtype))
    if found is None:
        return None
    tensors, scaling, limit = found
    base = layer.base_layer
    call = layer.backend.fused_branch(base, x, tensors, scaling, limit)
    native = None if call is None else (layer.backend, base, tensors, scaling, limit)
    if call is None:

        def call(x: torch.Tensor) -> torch.Tensor:
            out = base.forward(x)
            if kernels.cpu_branch_op(x, out) is not None:  # the op takes this base output
                return op(x, *tensors, scaling, limit, out)
            return adapter(x, out)

    hook_dicts = [base._forward_hooks, base._forward_pre_hooks, adapter._forward_hooks, adapter._forward_pre_hooks]
    return call, hook_dicts, native


def armed(routing: object) -> Iterator[None]:
    """Within a model call (:class:`~lordba.nn.model.LoRDBAModel`'s, in this thread, ``routing`` its routing):
    where gradients are off, nothing is traced and no global forward hook is set, the call's state — its
    routing, the kernel mode and the optimizer steps — is published as a token, the same object while none of
    it changes. A layer that has taken its kept call (:func:`decode_call`) under that token then takes it again
    after checking only what a call can change: the token, the adapters' epoch (:func:`touch`), the input's
    dtype, grad mode, tracing and the hooks of its base layer and adapter. Eager decode's per-layer checks cost
    ~4% of a step, this ~1% (docs/kernels.md). Never raises.

    A generator the model call's own generator delegates to (``yield from``), not a context manager: the token is
    set and put back in this frame, so a Ctrl-C at any point leaves none behind (a context manager's ``__enter__``
    and ``__exit__`` are Python code: one there as the token was set, or before it was put back, kept it while the
    traceback lived, and a layer called directly, outside any model call, took its kept call: in a
    ``disable_adapter`` block it added the adapter)."""
    previous = ARMED.token
    try:  # (set inside: a Ctrl-C as it is set puts it back)
        steady = not (torch.is_grad_enabled() or torch.compiler.is_compiling())
        ARMED.token = _token(routing) if steady and not (_global_forward_hooks or _global_forward_pre_hooks) else None
        yield
    finally:
        ARMED.token = previous


def _token(routing: object) -> tuple:
    key = (routing, kernels.get_mode(), _OPTIMIZER_STEPS[0])  # the epoch: checked by each layer
    last = _LAST_TOKEN[0]
    if last == key:
        return last  # layers compare tokens by identity
    _LAST_TOKEN[0] = key
    return key


def fused_direct(
    base_layer: nn.Module, backend: BaseBackend, adapter: AdapterBase, x: torch.Tensor
) -> torch.Tensor | None:
    """Under ``torch.compile`` (eager runs :func:`decode_call`): ``base_layer(x)`` plus ``adapter``'s
    branch in one call of the base backend's fused op (q4: ``lordba::q4_branch``), built in the trace,
    where it has one for ``x`` and the adapter's call is the inference kernel as it is; else ``None``
    (the caller runs the base layer and the branch apart). Only with gradients off: the fused op has
    no backward, and a trainable base bias must keep its gradient."""
    if torch.is_grad_enabled() or _hooked(base_layer, adapter):
        return None
    found = adapter._traced_call(x.dtype) if kernels.cpu_branch_op(x, x) is not None else None
    fused = None if found is None else backend.fused_branch(base_layer, x, *found)
    return None if fused is None else fused(x)


def routed_branches(
    adapters: Mapping[str, AdapterBase],
    names: Sequence[str],
    present: Sequence[str],
    x: torch.Tensor,
    base: torch.Tensor,
    prepared: dict | None = None,
) -> torch.Tensor | None:
    """``base`` plus each batch row's own adapter branch (row ``i``: ``adapters[names[i]]``, none if
    absent) in one kernel call for all adapters (:func:`lordba.kernels.packed_branch_rows`), each
    row's output equal to its adapter's own call on its rows. ``present``: the distinct names of
    ``names``. Returns ``None`` where the adapters' own calls are needed instead (tracing, a device
    or kernel mode without the batched op, a gradient to compute, dropout, trained biases, hooks on an adapter).

    ``prepared``: the calling layer's cache of kernel arguments per batch composition. Decode steps
    of a running batch repeat the same composition, so the per-adapter gathering runs once per layer
    and composition instead of once per layer and step (S-LoRA's adapter table, built lazily). It is
    used only for inference-form adapters (their tensors are passed as they are, so in-place changes
    are seen) and dropped whenever an adapter is added, removed or changed (:func:`touch`)."""
    mode = kernels.get_mode()
    if torch.compiler.is_compiling() or not x.is_cpu or mode not in kernels.CPU_MODES:
        return None
    grad = torch.is_grad_enabled()
    if grad and (x.requires_grad or base.requires_grad):
        return None
    held = adapters._modules if isinstance(adapters, nn.ModuleDict) else adapters
    if _hooked(*(held[name] for name in present if name in held)):  # every call: setting a hook does not touch()
        return None
    key = (names, mode, x.dtype, grad, x.device, _EPOCH[0], _OPTIMIZER_STEPS[0])
    call = prepared.get(key) if prepared is not None else None
    if call is None:
        call = _prepare(adapters, names, present, grad, (mode, x.dtype), x.device)
        if prepared is not None and call[1]:
            first = next(iter(list(prepared)), None)  # (a copy: another thread's forward may clear or add to it)
            if len(prepared) >= 32 or (first is not None and first[5:] != key[5:]):
                prepared.clear()  # bounded, and nothing kept from before a change
            prepared[key] = call
    args = call[0]
    if args is None:
        return None
    if not args[1]:
        return base
    index, tensors, scalings, limits = args
    return kernels.packed_branch_rows(x, index, tensors, scalings, base, limits)


def _prepare(
    adapters: Mapping[str, AdapterBase],
    names: Sequence[str],
    present: Sequence[str],
    grad: bool,
    key: tuple[str, torch.dtype],
    device: torch.device,
) -> tuple[tuple | None, bool]:
    """``((index, tensors, scalings, limits) or None, cacheable)`` for :func:`routed_branches`."""
    held = adapters._modules if isinstance(adapters, nn.ModuleDict) else adapters  # plain dict lookups
    names_held, args, cacheable = [], [], True
    for name in present:
        adapter = held.get(name)
        if adapter is not None:
            found = adapter._routed(grad, key)
            if found is None:
                return None, False
            cacheable = cacheable and adapter._routed_as_stored
            names_held.append(name)
            args.append(found)
    if not args:
        return (None, (), (), ()), cacheable
    position = {n: k for k, n in enumerate(names_held)}
    index = torch.tensor([position.get(n, -1) for n in names], dtype=torch.long, device=device)
    tensors, scalings, limits = zip(*args)
    return (index, tensors, scalings, limits), cacheable
