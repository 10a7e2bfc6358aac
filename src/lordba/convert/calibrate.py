"""Calibration statistics for activation-aware conversion: mean squared input per channel.

``collect_input_moments(model, batches, paths)`` runs the batches through ``model`` and returns
``{path: E[x_j²]}`` for the input of each linear module at ``path`` (paths as in the base model:
``model.layers.0.self_attn.q_proj``). With a ``peft.PeftModel`` the hooks go on its LoRA layers,
whose input is the base layer's input. Pass the result as ``convert_lora(..., calibration=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lordba.errors import ConversionError


def _root(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)  # peft.PeftModel → LoraModel → the wrapped model
    inner = getattr(base, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "peft_config") else model


@torch.no_grad()
def collect_input_moments(
    model: nn.Module, batches: Iterable[dict[str, Any] | torch.Tensor], paths: Iterable[str]
) -> dict[str, torch.Tensor]:
    """``{path: mean of x² over all tokens}`` (float32 [in]) for the inputs of the modules at ``paths``;
    each batch is a dict of model keyword arguments or a tensor of input ids."""
    root = _root(model)
    paths = list(paths)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[path] = sums.get(path, 0) + x.square().sum(0)
            counts[path] = counts.get(path, 0) + x.shape[0]

        return hook

    try:
        for path in paths:
            try:
                module = root.get_submodule(path)
            except AttributeError:
                raise ConversionError(f"calibration: the model has no module {path!r}") from None
            hooks.append(module.register_forward_pre_hook(hook_for(path)))
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(set(paths) - set(sums))
    if missing:
        raise ConversionError(f"calibration: no input reached module(s) {missing[:4]}")
    return {p: (sums[p] / counts[p]).float() for p in sorted(sums)}
