"""Peak tensor memory of a training step on any device, CPU included.

CPU PyTorch has no ``max_memory_allocated``. :class:`LiveTensorBytes` is a dispatch mode that sees
every tensor an operator creates and counts the bytes of storages still alive (each one is
released through a weak-reference callback), so the peak covers activations saved for backward,
temporaries, gradients and optimizer updates. What exists before the step (weights, adapter
parameters, optimizer state, quantizer metadata) is counted once by :func:`resident_bytes`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Tracks ``current`` and ``peak`` bytes of storages created while active."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen.add(storage)
                    nbytes = storage.nbytes()
                    self.current += nbytes
                    weakref.finalize(storage, self._release, nbytes)
        self.peak = max(self.peak, self.current)
        return out


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages held by the model (parameters, buffers, tensors kept in module
    attributes such as HQQ's quantization metadata) and the optimizer state."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, dict):
                tensors += [v for v in value.values() if isinstance(v, torch.Tensor)]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if key not in seen and s.nbytes():
            seen.add(key)
            total += s.nbytes()
    return total


def step_memory(model: torch.nn.Module, batch: dict, lr: float = 1e-4) -> dict[str, float]:
    """Memory of one training step of ``model``'s trainable parameters with a fresh AdamW: resident
    tensors once the optimizer state exists, plus the live peak of a second step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    resident = resident_bytes(model, opt)
    with LiveTensorBytes() as live:
        step()
    return {
        "resident_bytes": resident,
        "step_peak_live_bytes": live.peak,
        "peak_bytes": resident + live.peak,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
