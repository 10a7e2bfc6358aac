"""Whole-model cases of the latency suite: the demo model as base alone, with an fp16-sized PEFT
LoRA, and with a packed LoRDBA adapter of the same rank on the same (optionally quantized) base;
and the prefill profile that splits each adapted layer's time into base and adapter.

The activation dtype is the model's, float32 (CPU fp16 matmuls are slow; bf16 would change the
base's numerics); PEFT holds its LoRA factors in that same dtype (its ``autocast_adapter_dtype``
default), so "fp16 LoRA" means the fp16 LoRA *file*, computed in float32 like every other layer.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lordba._util.modules import cache_keyword, output_cache
from lordba.errors import ConfigError
from lordba_lab.bench._timing import Stats, interleaved

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCALE_DTYPE = "int8"  # the ≥10×-smaller configuration (SPEC §2); the kernels see decoded float32 scales
BASES = ("none", "hqq", "bnb")


def quantized(model: nn.Module, base: str, source: str | Path | None = None) -> nn.Module:
    """``model`` with its linear layers quantized by ``base`` (4-bit, group 64), or unchanged for ``none``.

    ``source``: the folder ``model`` was loaded from, to reuse the quantized base that the set-up
    cached (``lordba fetch-assets --quantize-base``) instead of running HQQ again.
    """
    if base not in BASES:
        raise ConfigError(f"--base must be one of {BASES}, got {base!r}")
    if base == "none":
        return model
    from lordba.quant import quantize_model
    from lordba.quant.cache import quantize_model_cached

    if source is not None:
        return quantize_model_cached(model, source, backend=base, bits=4, group_size=64)
    return quantize_model(model, backend=base, bits=4, group_size=64)


def variants(
    model: nn.Module, r: int, base: str, source: str | Path | None = None, autocast_adapter_dtype: bool = True
) -> dict[str, nn.Module]:
    """``{"base", "lora", "lordba"}``: three copies of ``model`` on the same base weights.

    ``autocast_adapter_dtype``: PEFT's option of that name (``True``, its default: LoRA factors of a
    bfloat16 / float16 model held in float32; ``False``: in the model's dtype, as served on a GPU)."""
    from lordba.config import LoRDBAConfig
    from lordba.nn.model import LoRDBAModel, get_lordba_model
    from lordba.train.lora import get_peft_lora_model, peft_lora_config

    torch.manual_seed(0)
    plain = quantized(copy.deepcopy(model), base, source).eval()
    lora_cfg = peft_lora_config(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
    lora = get_peft_lora_model(
        quantized(copy.deepcopy(model), base, source), lora_cfg, autocast_adapter_dtype=autocast_adapter_dtype
    ).eval()
    trained = get_lordba_model(
        copy.deepcopy(model),
        LoRDBAConfig(r=r, alpha=2 * r, target_modules=TARGETS, init="random", scale_dtype=SCALE_DTYPE),
    )
    with tempfile.TemporaryDirectory() as tmp:  # served as from its file (compact: scales held as stored)
        trained.save_pretrained(tmp)
        lordba = LoRDBAModel.from_pretrained(quantized(copy.deepcopy(model), base, source), tmp).eval()
    return {"base": plain, "lora": lora, "lordba": lordba}


def adapter_bytes(models: dict[str, nn.Module]) -> dict[str, int]:
    """Adapter bytes in memory (as held at inference, caches included) and in the files."""
    from safetensors.torch import save_file

    from lordba.nn.adapter import held_nbytes

    lordba, lora = models["lordba"], models["lora"]
    lora_params = {n: p for n, p in lora.named_parameters() if "lora_" in n}
    with tempfile.TemporaryDirectory() as tmp:
        lordba.save_pretrained(tmp)
        lordba_disk = (Path(tmp) / "lordba_model.safetensors").stat().st_size
        fp16 = {n: p.detach().to(torch.float16).contiguous() for n, p in lora_params.items()}
        save_file(fp16, str(Path(tmp) / "adapter_model.safetensors"))
        lora_disk = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return {
        "lordba_mem_bytes": held_nbytes(list(lordba.adapter_modules("default").values())),
        "lora_mem_bytes": sum(p.numel() * p.element_size() for p in lora_params.values()),
        "lordba_disk_bytes": lordba_disk,
        "lora_disk_bytes": lora_disk,
    }


def _vocab(model: nn.Module) -> int:
    """Token ids to draw from: the first 1000 (ordinary tokens) or the whole vocabulary if smaller."""
    return min(1000, model.get_input_embeddings().num_embeddings)


def time_model(models: dict[str, nn.Module], prompt: int, budget_s: float, quick: bool) -> dict[str, dict[str, Stats]]:
    """``{"model-prefill": stats, "model-decode": stats}`` for a ``prompt``-token prefill (no
    cache) and for one decode step after a ``prompt``-token context (KV cache cropped back after
    every step, so each step sees the same context)."""
    torch.manual_seed(1)
    ids = torch.randint(0, _vocab(models["base"]), (1, prompt + 1))
    results = {}
    with torch.inference_mode():
        prefill = {k: (lambda m=m: m(input_ids=ids[:, :prompt], use_cache=False)) for k, m in models.items()}
        results["model-prefill"] = interleaved(prefill, budget_s, min_reps=6 if quick else 10, max_reps=40)
        caches = {k: output_cache(m(input_ids=ids[:, :prompt], use_cache=True)) for k, m in models.items()}
        step = ids[:, prompt : prompt + 1]
        kvs = {k: {cache_keyword(m): caches[k]} for k, m in models.items()}  # (looked up once, not timed)
        decode = {k: (lambda m=m, kv=kvs[k]: m(input_ids=step, use_cache=True, **kv)) for k, m in models.items()}
        results["model-decode"] = interleaved(
            decode, budget_s / 2, min_reps=10, max_reps=100, after=lambda k: caches[k].crop(-1)
        )
    return results


def prefill_profile(models: dict[str, nn.Module], prompt: int, reps: int) -> list[dict]:
    """Where the adapters' prefill time goes: per target module (``q_proj``, …, summed over the
    model's blocks), the time of the adapted layers and of their base layers, for LoRA and LoRDBA
    (``reps`` interleaved prefills, medians). ``adapter = layer - base`` is what each adapter adds
    to its layers, the quantity the ratio of whole-model times dilutes with everything else."""
    torch.manual_seed(1)
    ids = torch.randint(0, _vocab(models["base"]), (1, prompt))
    names = ("lora", "lordba")
    layers: dict[str, list[dict[tuple[str, str], float]]] = {n: [] for n in names}  # per prefill
    model_s: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            models[n](input_ids=ids, use_cache=False)
        for rep in range(reps):
            for n in names if rep % 2 == 0 else names[::-1]:
                acc: dict[tuple[str, str], float] = {}
                with _layer_timers(models[n], acc):
                    start = time.perf_counter()
                    models[n](input_ids=ids, use_cache=False)
                    model_s[n].append(time.perf_counter() - start)
                layers[n].append(acc)
    rows = []
    for target in [*dict.fromkeys(t for t, _ in layers["lora"][0]), "all"]:
        row = {"target": target}
        for n in names:
            layer = [_summed(acc, "layer", target) for acc in layers[n]]
            base = [_summed(acc, "base", target) for acc in layers[n]]
            row[f"{n}_layer_s"] = statistics.median(layer)
            row[f"{n}_base_s"] = statistics.median(base)
            row[f"{n}_adapter_s"] = statistics.median(a - b for a, b in zip(layer, base))
            row[f"{n}_model_s"] = statistics.median(model_s[n])
        row["adapter_ratio"] = row["lordba_adapter_s"] / row["lora_adapter_s"]
        rows.append(row)
    return rows


def _summed(acc: dict[tuple[str, str], float], kind: str, target: str) -> float:
    """Time of one ``kind`` ("layer" or "base") over the modules of ``target`` (or of all targets)."""
    return sum(v for (t, k), v in acc.items() if k == kind and target in (t, "all"))


class _layer_timers:
    """Context manager: forward hooks that add each adapted layer's and its base layer's wall time
    into ``acc[(target, "layer")]`` / ``acc[(target, "base")]`` (adapted layer = one with a
    ``base_layer``, as in PEFT and lordba; target = the last part of its name)."""

    def __init__(self, model: nn.Module, acc: dict[tuple[str, str], float]) -> None:
        self.model, self.acc, self.handles = model, acc, []

    def _hook(self, module: nn.Module, key: tuple[str, str]) -> None:
        started: list[float] = []

        def pre(*_: object) -> None:
            started.append(time.perf_counter())

        def post(*_: object) -> None:
            self.acc[key] = self.acc.get(key, 0.0) + time.perf_counter() - started.pop()

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def __enter__(self) -> _layer_timers:
        for name, module in self.model.named_modules():
            base = getattr(module, "base_layer", None)
            if isinstance(base, nn.Module) and not hasattr(base, "base_layer"):
                target = name.rsplit(".", 1)[-1]
                self._hook(module, (target, "layer"))
                self._hook(base, (target, "base"))
        return self

    def __exit__(self, *_: object) -> None:
        for h in self.handles:
            h.remove()
