"""Whole-model cases of the latency suite: the demo model as base alone, with an fp16-sized PEFT
LoRA, and with a packed LoRDBA adapter of the same rank on the same (optionally quantized) base.

The activation dtype is the model's, float32 (CPU fp16 matmuls are slow; bf16 would change the
base's numerics); PEFT holds its LoRA factors in that same dtype (its ``autocast_adapter_dtype``
default), so "fp16 LoRA" means the fp16 LoRA *file*, computed in float32 like every other layer.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ._timing import Stats, interleaved

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCALE_DTYPE = "int8"  # the ≥10×-smaller configuration (SPEC §2); the kernels see decoded float32 scales
BASES = ("none", "hqq", "bnb")


def quantized(model: nn.Module, base: str) -> nn.Module:
    """``model`` with its linear layers quantized by ``base`` (4-bit, group 64), or unchanged for ``none``."""
    if base not in BASES:
        raise ConfigError(f"--base must be one of {BASES}, got {base!r}")
    if base == "none":
        return model
    try:
        from ..quant import quantize_model
    except ImportError as err:
        raise ConfigError(f"--base {base}: lordba.quant.quantize_model is not available in this version") from err
    return quantize_model(model, backend=base, bits=4, group_size=64)


def variants(model: nn.Module, r: int, base: str) -> dict[str, nn.Module]:
    """``{"base", "lora", "lordba"}``: three copies of ``model`` on the same base weights."""
    from peft import LoraConfig, get_peft_model

    from ..config import LoRDBAConfig
    from ..model import get_lordba_model

    torch.manual_seed(0)
    plain = quantized(copy.deepcopy(model), base).eval()
    lora_cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    lora = get_peft_model(quantized(copy.deepcopy(model), base), lora_cfg).eval()
    lordba = get_lordba_model(
        quantized(copy.deepcopy(model), base),
        LoRDBAConfig(r=r, alpha=2 * r, target_modules=TARGETS, init="random", scale_dtype=SCALE_DTYPE),
    )
    lordba.pack()
    lordba.eval()
    return {"base": plain, "lora": lora, "lordba": lordba}


def adapter_bytes(models: dict[str, nn.Module]) -> dict[str, int]:
    """Adapter bytes in memory (as held at inference, caches included) and in the files."""
    from safetensors.torch import save_file

    from ..kernels.cache import cache_nbytes

    lordba, lora = models["lordba"], models["lora"]
    packed = sum(b.numel() * b.element_size() for n, b in lordba.named_buffers() if n.endswith(("sign_A", "sign_B")))
    scales = sum(p.numel() * p.element_size() for n, p in lordba.named_parameters() if ".scale_" in n)
    lora_params = {n: p for n, p in lora.named_parameters() if "lora_" in n}
    with tempfile.TemporaryDirectory() as tmp:
        lordba.save_pretrained(tmp)
        lordba_disk = (Path(tmp) / "lordba_model.safetensors").stat().st_size
        fp16 = {n: p.detach().to(torch.float16).contiguous() for n, p in lora_params.items()}
        save_file(fp16, str(Path(tmp) / "adapter_model.safetensors"))
        lora_disk = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {
        "lordba_mem_bytes": packed + scales + cache_nbytes(lordba)["total"],
        "lora_mem_bytes": sum(p.numel() * p.element_size() for p in lora_params.values()),
        "lordba_disk_bytes": lordba_disk,
        "lora_disk_bytes": lora_disk,
    }


def time_model(models: dict[str, nn.Module], prompt: int, budget_s: float, quick: bool) -> dict[str, dict[str, Stats]]:
    """``{"model-prefill": stats, "model-decode": stats}`` for a ``prompt``-token prefill (no
    cache) and for one decode step after a ``prompt``-token context (KV cache cropped back after
    every step, so each step sees the same context)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (1, prompt + 1))
    results = {}
    with torch.inference_mode():
        prefill = {k: (lambda m=m: m(input_ids=ids[:, :prompt], use_cache=False)) for k, m in models.items()}
        results["model-prefill"] = interleaved(prefill, budget_s, min_reps=3 if quick else 5, max_reps=30)
        caches = {k: m(input_ids=ids[:, :prompt], use_cache=True).past_key_values for k, m in models.items()}
        step = ids[:, prompt : prompt + 1]
        decode = {
            k: (lambda k=k, m=m: m(input_ids=step, past_key_values=caches[k], use_cache=True))
            for k, m in models.items()
        }
        results["model-decode"] = interleaved(
            decode, budget_s / 2, min_reps=10, max_reps=100, after=lambda k: caches[k].crop(-1)
        )
    return results
