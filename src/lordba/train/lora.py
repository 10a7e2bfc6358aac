"""The fp16 LoRA side of training: a PEFT LoRA on the same (quantized) base, used as the seed of
the ``ptq``, ``qat-from-lora`` and ``scales-only`` modes and as the baseline LoRDBA is compared with.

LoRA is trained in float32 on CPU (fp16 training is impractical there) and stored in fp16, which is
what "fp16 LoRA" refers to in size comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConversionError


@dataclass
class LoraFactors:
    """One layer's LoRA: ``ΔW = scaling · B @ A`` with ``A`` (r×in), ``B`` (out×r), float32."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


def add_lora(
    model: nn.Module, r: int, alpha: float, target_modules: list[str] | str | None, seed: int = 0
) -> nn.Module:
    """A PEFT LoRA model (A Kaiming-uniform, B = 0) on ``model``; only the LoRA factors train."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = "all-linear" if target_modules is None else target_modules
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))


def lora_factors(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraFactors]:
    """``{module path in the base model: LoraFactors}`` of an in-memory PEFT LoRA model."""
    out = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {})):
            continue
        if getattr(module, "use_dora", {}).get(adapter_name, False):
            raise ConversionError(f"{name}: DoRA adapters cannot be converted (magnitude vectors are not LoRA)")
        path = name[len(prefix) :] if name.startswith(prefix) else name
        A = module.lora_A[adapter_name].weight.detach().float().clone()
        B = module.lora_B[adapter_name].weight.detach().float().clone()
        out[path] = LoraFactors(A, B, float(module.scaling[adapter_name]))
    if not out:
        raise ConversionError("the model has no LoRA layers")
    return out
