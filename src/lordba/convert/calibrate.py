"""Calibration statistics for activation-aware conversion: mean squared input per channel.

``collect_input_moments(model, batches, paths)`` runs the batches through ``model`` and returns
``{path: E[x_j²]}`` for the input of each linear module at ``path`` (paths as in the base model:
``model.layers.0.self_attn.q_proj``). With a ``peft.PeftModel`` the hooks go on its LoRA layers,
whose input is the base layer's input. Pass the result as ``convert_lora(..., calibration=...)``.
A batch given as a dict with an ``attention_mask`` counts only the positions the mask keeps: the
padding of sequences of different lengths batched together is not calibration data. The model runs in
eval mode (dropout off), its modules' own modes restored after. Only the calling thread's model calls count: another
thread calling the model meanwhile (serving it) adds nothing (so a model that runs its modules in threads of its own,
``nn.DataParallel`` over several GPUs, is not calibrated through).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lordba._util.interrupts import PutBack
from lordba._util.modules import eval_mode
from lordba.errors import ConversionError


def _root(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)  # peft.PeftModel → LoraModel → the wrapped model
    inner = getattr(base, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "peft_config") else model


@torch.no_grad()
def collect_input_moments(
    model: nn.Module, batches: Iterable[dict[str, Any] | torch.Tensor], paths: Iterable[str]
) -> dict[str, torch.Tensor]:
    """``{path: mean of x² over all tokens}`` (float32 [in], on the CPU) for the inputs of the modules at ``paths``;
    each batch is a dict of model keyword arguments or a tensor of input ids (moved to the model's device). A dict's
    ``attention_mask`` ([batch, seq]) leaves out the positions it masks (padding) wherever a module's
    input has one row per position. The batches run in eval mode (no dropout); each module's mode is
    restored afterwards. Other threads' calls of the model meanwhile are not counted."""
    root = _root(model)
    paths = list(paths)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor | None] = [None]  # the current batch's attention mask
    caller = threading.get_ident()

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if threading.get_ident() != caller:  # another thread's call (serving the model meanwhile): not our batches
                return
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            keep = mask[0]
            if keep is not None and keep.numel() == x.shape[0]:
                x = x[keep.reshape(-1).to(x.device)]  # padding left out (not multiplied by 0: it may be NaN)
            # summed on CPU in float64 whatever the device: the result goes with CPU LoRA factors, and a float32
            # running sum drops small batches after a large one
            sums[path] = sums.get(path, 0) + x.square().sum(0).cpu().double()
            counts[path] = counts.get(path, 0) + x.shape[0]

        return hook

    hooks = {path: hook_for(path) for path in paths}
    modules = [(_module(root, path), hook) for path, hook in hooks.items()]
    put_back = PutBack(_remove_hook, modules)  # (taken off by the function: a handle a Ctrl-C lost needs none)
    with eval_mode(model):  # dropout off (PEFT's EVA calibrates so too); every module's own mode is put back
        try:
            for module, hook in modules:
                module.register_forward_pre_hook(hook)
            device = next((p.device for p in model.parameters()), None)
            for batch in batches:
                batch = _to_device(batch, device)
                mask[0] = _padding_mask(batch)
                model(**batch) if isinstance(batch, dict) else model(batch)
        finally:
            try:  # (a first try apart: a Ctrl-C pending as it begins is caught here, a second one at the next try)
                put_back()
            except KeyboardInterrupt as err:
                put_back.interrupted = err
                while True:  # (once one of them held SIGINT back: no Ctrl-C is raised, see PutBack)
                    try:
                        put_back()
                        break
                    except KeyboardInterrupt as err:
                        put_back.interrupted = err
            put_back.done()
    missing = sorted(p for p in set(paths) if counts.get(p, 0) <= 0)
    if missing:
        raise ConversionError(f"calibration: no input reached module(s) {missing[:4]}")
    return {p: (sums[p] / counts[p]).float() for p in sorted(sums)}


def _module(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` below ``root``; :class:`ConversionError` naming the path where there is none."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ConversionError(f"calibration: the model has no module {path!r}") from None


def _remove_hook(module_and_hook: tuple[nn.Module, Any]) -> None:
    """Take the forward pre-hook ``hook`` off ``module``, wherever it was registered, by the function itself: a
    Ctrl-C just after a registration returned lost its handle. Can be done twice."""
    module, hook = module_and_hook
    hooks = module._forward_pre_hooks
    for key in [key for key, one in hooks.items() if one is hook]:
        hooks.pop(key, None)
        module._forward_pre_hooks_with_kwargs.pop(key, None)


def _to_device(batch: dict[str, Any] | torch.Tensor, device: torch.device | None) -> dict[str, Any] | torch.Tensor:
    """The batch's tensors on the model's (first parameter's) device, as a training loop puts them."""
    if device is None or device.type == "meta":  # offloaded weights (accelerate): its hooks place the inputs
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _padding_mask(batch: dict[str, Any] | torch.Tensor) -> torch.Tensor | None:
    """The batch's 2-D ``attention_mask`` (nonzero: a real token), or ``None`` (every position counts)."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask != 0
