"""The adapters' change counters, which the layers' kept kernel calls and the caches are keyed on: the adapter
epoch (:func:`touch`: any adapter added, removed, replaced or changed), the optimizer steps taken in this process
(fused and foreach optimizers do not bump version counters), and :func:`stamp`, what identifies tensors' contents;
the containers that :func:`touch` on every write (an adapter's buffers, a layer's :class:`AdapterDict`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_OPTIMIZER_STEPS = [0]
_EPOCH = [0]  # bumped by any change to what a mixed batch's prepared kernel call holds (see routed_branches)


def touch() -> None:
    """Invalidate every layer's prepared mixed-batch calls (an adapter was added, removed or changed)."""
    _EPOCH[0] += 1


class TouchingDict(dict):
    """An adapter's ``_buffers``: a dict whose every write calls :func:`touch`. The layers' kept calls hold an
    inference adapter's buffers; ``torch.func.functional_call`` (and accelerate's tensor setters) swap tensors by
    writing this dict directly, past ``__setattr__`` and ``register_buffer``, and the kept calls ran the held ones."""

    __slots__ = ()

    def __setitem__(self, key: str, value: torch.Tensor | None) -> None:
        super().__setitem__(key, value)
        touch()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        touch()

    def pop(self, *args: object) -> object:
        touch()
        return super().pop(*args)

    def update(self, *args: object, **kwargs: object) -> None:
        super().update(*args, **kwargs)
        touch()


class AdapterDict(nn.ModuleDict):
    """A layer's adapters by name (``lordba_adapters``): an :class:`nn.ModuleDict` whose every change — an
    adapter set, replaced or removed through it directly (``layer.lordba_adapters[name] = other``, ``del``,
    ``pop``, ``update``, ``clear``), as PEFT code does with ``lora_A[name]`` — drops the layers' kept calls
    (:func:`touch`), as :meth:`LoRDBALinear.add_adapter` does: a kept call ran the adapter it was made for."""

    def add_module(self, name: str, module: nn.Module | None) -> None:
        """:meth:`nn.Module.add_module` (``d[name] = m``, ``update``, ``register_module``), then :func:`touch`."""
        super().add_module(name, module)
        touch()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        touch()

    def clear(self) -> None:
        """Remove every adapter."""
        super().clear()
        touch()

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        touch()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        touch()


def _count_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    _OPTIMIZER_STEPS[0] += 1


# Fused and foreach optimizers (AdamW(fused=True), the HF Trainer's default) update parameters without
# bumping their version counters: every optimizer step therefore invalidates the caches too.
register_optimizer_step_post_hook(_count_step)


def stamp(*tensors: torch.Tensor) -> tuple:
    """What identifies the contents of ``tensors`` for a cache key: version counters and storage,
    and the number of optimizer steps taken in this process. An address identifies a storage only while
    it lives: an entry made for it keeps it (``pins`` of :meth:`_Caches.store`)."""
    return (_OPTIMIZER_STEPS[0], *((t._version, t.data_ptr()) for t in tensors))
