"""GPT-2-family ``Conv1D`` layers (``transformers.pytorch_utils.Conv1D``): a linear layer whose weight
is stored transposed, ``in × out`` (PEFT's ``fan_in_fan_out``). ``y = x W + b``.

The adapter sees an ordinary ``in → out`` layer; only the weight's orientation differs, so
dequantizing transposes it and merging adds the transposed delta in place.
"""

from __future__ import annotations

import torch
from torch import nn

from lordba.quant.backend import BaseBackend


def conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


class Conv1DBackend(BaseBackend):
    """transformers' ``Conv1D`` (unquantized, weight ``in × out``): merge adds ``deltaᵀ`` in place."""

    name = "conv1d"

    def matches(self, module: nn.Module) -> bool:
        cls = conv1d_class()
        return cls is not None and isinstance(module, cls)

    def features(self, module: nn.Module) -> tuple[int, int]:
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float().t().clone()

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            module.weight.add_(delta.t().to(module.weight.dtype))
        return module

    def unmerge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            module.weight.sub_(delta.t().to(module.weight.dtype))
        return module

    def bits_per_weight(self, module: nn.Module) -> float:
        return 8.0 * module.weight.element_size()
