"""The fp16 LoRA side of training: a PEFT LoRA on the same (quantized) base, used as the seed of
the ``ptq``, ``qat-from-lora`` and ``scales-only`` modes and as the baseline LoRDBA is compared with.

LoRA is trained in float32 on CPU (fp16 training is impractical there) and stored in fp16, which is
what "fp16 LoRA" refers to in size comparisons. Its factors are read back with
:func:`lordba.convert.read_lora`.
"""

from __future__ import annotations

import torch
from torch import nn


def add_lora(
    model: nn.Module, r: int, alpha: float, target_modules: list[str] | str | None, seed: int = 0
) -> nn.Module:
    """A PEFT LoRA model (A Kaiming-uniform, B = 0) on ``model``; only the LoRA factors train."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = "all-linear" if target_modules is None else target_modules
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
