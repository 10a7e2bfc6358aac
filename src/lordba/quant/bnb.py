"""bitsandbytes NF4 bases (``bnb.nn.Linear4bit``): the QLoRA format users know; 4 bits only.

bitsandbytes ships official CPU wheels; on CPU it dequantizes then multiplies (the fast fused
kernels need a hub download, which this library never does), so HQQ is the faster default here.
"""

from __future__ import annotations

import torch
from torch import nn

from lordba.quant.backend import BaseBackend


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


class BnbNF4Backend(BaseBackend):
    """bitsandbytes ``Linear4bit`` (NF4) layers; merging requantizes into a new layer."""

    name = "bnb"
    in_place_merge = False
    bits = 4.0

    def matches(self, module: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear4bit)

    def weight_device(self, module: nn.Module) -> torch.device:
        return module.weight.device

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        w = module.weight
        return _bnb().functional.dequantize_4bit(w.data, w.quant_state).float()

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        weight = self.dequantize(module) + delta.float()
        return _make_linear4bit(weight, module.bias, module.compute_dtype, module.weight.quant_type)


def _make_linear4bit(
    weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, quant_type: str = "nf4"
) -> nn.Module:
    bnb = _bnb()
    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(weight.detach().float().cpu(), requires_grad=False, quant_type=quant_type)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)


def quantize_linear_bnb(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A ``Linear4bit`` (NF4) replacing ``linear``."""
    return _make_linear4bit(linear.weight.data, linear.bias, compute_dtype, "nf4")
