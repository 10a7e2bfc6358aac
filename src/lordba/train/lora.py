"""The fp16 LoRA side: a PEFT LoRA on the same targets as the LoRDBA adapter (seeds and baselines)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lordba.nn.targets import find_targets


def peft_lora_config(**kwargs: Any) -> Any:
    """PEFT's ``LoraConfig(**kwargs)``, able to wrap lordba's own quantized layers too (its HQQ layers with PEFT's
    HQQ LoRA layer, the ``q4`` base with :class:`~lordba.train._peft_q4.Q4LoraLinear`: PEFT's LoRA ``Linear`` computes
    ``base_layer(x)`` plus its branch, which is all a frozen base needs; merging a PEFT LoRA into a q4 base is not
    supported)."""
    from peft import LoraConfig

    from lordba.train._peft_q4 import custom_modules

    config = LoraConfig(**kwargs)
    config._register_custom_module(custom_modules())
    return config


def get_peft_lora_model(model: nn.Module, config: Any, **kwargs: Any) -> nn.Module:
    """``peft.get_peft_model``, without PEFT's warning about the q4 layers: from PEFT 0.19 on the layer
    :func:`peft_lora_config` registers reads their features itself, so PEFT has nothing to warn about and the warning
    filters are left alone; an earlier PEFT reads them itself and warns for each, silenced here as before (with
    ``warnings.catch_warnings``, which is not thread-safe: there only)."""
    from peft import get_peft_model

    from lordba.train._peft_q4 import reads_features

    if reads_features():
        return get_peft_model(model, config, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        return get_peft_model(model, config, **kwargs)


def add_lora(
    model: nn.Module, r: int, alpha: float, target_modules: list[str] | str | None, seed: int = 0
) -> nn.Module:
    """A PEFT LoRA model (A Kaiming-uniform, B = 0) on ``model``; only the LoRA factors train.

    ``target_modules`` as in :class:`~lordba.LoRDBAConfig`; ``None`` and ``"all-linear"`` are resolved
    by lordba's own rule (:func:`~lordba.nn.targets.find_targets`: every linear layer but the
    output head, quantized ones included, which PEFT's ``"all-linear"`` would not find on an HQQ base).
    Raises :class:`~lordba.errors.TargetModulesError` if nothing matches.
    """
    torch.manual_seed(seed)
    targets = target_modules
    if target_modules is None or target_modules == "all-linear":
        targets = find_targets(model, target_modules)
    config = peft_lora_config(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    return get_peft_lora_model(model, config)
