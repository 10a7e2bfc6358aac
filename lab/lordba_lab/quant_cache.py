"""A disk cache of quantized bases, so that slow quantizers run once per model and setting.

HQQ's half-quadratic optimiser takes minutes for a whole model on 2 CPU cores (about 0.5–1.7 s per
layer of SmolLM2) and gives ~20% lower weight error than plain rounding. Its quantized state is a
set of tensors, stored here as safetensors (no pickle) under ``cache_dir()/quantized/``, keyed by the
model's files and the quantization settings. bitsandbytes quantizes in milliseconds: no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lordba._util.modules import replace_submodule
from lordba._version import __version__
from lordba.quant.quantize import quantizable, quantize_model


def _key(source: Path, backend: str, bits: int, group_size: int) -> str:
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in source.glob("*")
        if p.suffix in (".safetensors", ".json")
    )
    try:
        from importlib.metadata import version

        hqq_version = version("hqq")
    except Exception:
        hqq_version = "?"
    blob = json.dumps([str(source.resolve()), files, backend, bits, group_size, hqq_version, __version__])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def quantize_model_cached(
    model: nn.Module,
    source: str | Path,
    backend: str = "hqq",
    bits: int = 4,
    group_size: int = 64,
    progress: bool = False,
) -> nn.Module:
    """:func:`quantize_model` for a model loaded from the folder ``source``, reusing a cached result."""
    from lordba._util.cachedir import cache_dir  # lazily: assets imports the library

    source = Path(source)
    if backend != "hqq" or not source.is_dir():
        return quantize_model(model, backend, bits, group_size, progress=progress)
    path = cache_dir() / "quantized" / f"{_key(source, backend, bits, group_size)}.safetensors"
    if path.is_file():
        _load(model, path, bits, group_size)
        return model
    quantize_model(model, backend, bits, group_size, progress=progress)
    state = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "HQQLinear":
            for k, v in module.state_dict().items():
                state[f"{name}::{k}"] = v.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return model


def _load(model: nn.Module, path: Path, bits: int, group_size: int) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    state = load_file(str(path))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in quantizable(model):
        prefix = f"{name}::"
        sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        config = {**BaseQuantizeConfig(nbits=bits, group_size=group_size), "offload_meta": False}
        q = HQQLinear(
            None, config, compute_dtype=linear.weight.dtype, device=str(linear.weight.device), initialize=False
        )
        q.load_state_dict(sd)
        replace_submodule(model, name, q)
    model.lordba_quantization = {"backend": "hqq", "bits": bits, "group_size": group_size}
    torch.nn.Module.train(model, model.training)
