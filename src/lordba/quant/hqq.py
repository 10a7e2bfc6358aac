"""HQQ (Half-Quadratic Quantization) bases: ``hqq.core.quantize.HQQLinear``, 1–8 bits.

Pure-PyTorch backend, real bit packing, gradients to the input, 1–8 bits. Its optimiser is also what
the default ``q4`` base (:mod:`lordba.quant.q4`) uses to choose its groups; HQQ's own CPU forward
dequantizes the whole weight on every call (``lordba bench --suite quant``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lordba.quant.backend import BaseBackend


def _hqq_linear_cls() -> type | None:
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        return None
    return HQQLinear


class HQQBackend(BaseBackend):
    """HQQ ``HQQLinear`` layers; merging requantizes into a new layer with the same settings."""

    name = "hqq"
    in_place_merge = False

    def matches(self, module: nn.Module) -> bool:
        cls = _hqq_linear_cls()
        return cls is not None and isinstance(module, cls)

    def weight_device(self, module: nn.Module) -> torch.device:
        return module.W_q.device

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize().float()

    def merge(self, module: nn.Module, delta: torch.Tensor) -> nn.Module:
        weight = (self.dequantize(module) + delta.float()).to(module.compute_dtype)
        config = copy.deepcopy(module.quant_config)  # HQQLinear pops "offload_meta" out of its config
        merged = _hqq_linear_cls()(
            None,
            {**config, "offload_meta": module.offload_meta},
            compute_dtype=module.compute_dtype,
            device=module.device,
            initialize=False,
        )
        merged.quantize(weight, **config)
        merged.bias = module.bias
        return merged

    def bits_per_weight(self, module: nn.Module) -> float:
        return float(module.meta["nbits"])

    def describe(self, module: nn.Module) -> dict[str, Any] | None:
        group = module.meta.get("group_size")
        return {
            "backend": "hqq",
            "bits": int(module.meta["nbits"]),
            "group_size": None if group is None else int(group),
        }


def quantize_linear_hqq(linear: nn.Linear, bits: int, group_size: int, compute_dtype: torch.dtype) -> nn.Module:
    """An ``HQQLinear`` replacing ``linear`` (its float weight is released)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    return HQQLinear(linear, config, compute_dtype=compute_dtype, device=str(linear.weight.device), del_orig=True)
