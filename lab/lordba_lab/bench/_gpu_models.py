"""Whole-model rows of the gpu suite: a Llama-architecture model of SmolLM2-135M's or Llama-7B's
shape with random bfloat16 weights (timing needs no trained weights), base alone, + PEFT LoRA and
+ LoRDBA (loaded packed from its file), timed side by side on the GPU."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable

import torch
from torch import nn

from lordba_lab.bench._gpu_timing import captured, interleaved_gpu
from lordba_lab.bench._latency_model import variants
from lordba_lab.bench._timing import paired_ratio

MODEL_SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
PROMPT = 512
RANK = 16


def _base(name: str, device: str) -> nn.Module:
    """The model of ``name``'s shape, random bfloat16 weights, made on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = MODEL_SHAPES.get(name, TINY)
    config = LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 4096, **shape})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(before)


def _row(name: str, case: str, mode: str, timed: dict, check: float | None) -> dict:
    return {
        "case": case,
        "model": name,
        "mode": mode,
        "base_ms": timed["base"].median * 1e3,
        "lora_x": paired_ratio(timed["lora"], timed["base"]).median,
        "lordba_x": paired_ratio(timed["lordba"], timed["base"]).median,
        "lordba_vs_lora": paired_ratio(timed["lordba"], timed["lora"]).median,
        "check": check,
    }


def _check(lordba: nn.Module, ids: torch.Tensor) -> float:
    """Largest difference of the LoRDBA model's last logits through the Triton kernels from the
    pure-PyTorch reference of the same adapter, relative to the reference's largest magnitude, on a
    float32 copy: in bfloat16 the two round differently (the kernels once, in float32; the reference
    at each step), and through a random network's layers such differences grow into noise that says
    nothing about the kernels."""
    from lordba import kernels

    exact = copy.deepcopy(lordba).float()
    with torch.inference_mode():
        got = exact(input_ids=ids, logits_to_keep=1).logits
        with kernels.mode("torch"):
            want = exact(input_ids=ids, logits_to_keep=1).logits
    del exact
    return ((got - want).abs().max() / want.abs().max()).item()


def _prefill(models: dict, ids: torch.Tensor, rounds: int) -> dict:
    fns = {k: (lambda m=m: m(input_ids=ids, use_cache=False, logits_to_keep=1)) for k, m in models.items()}
    return interleaved_gpu(fns, rounds, 1)


def _decode(models: dict, ids: torch.Tensor, rounds: int) -> dict:
    """One eager decode step after ``ids[:, :-1]`` in a dynamic cache, cropped back after each step."""
    from lordba._util.modules import cache_keyword, output_cache

    caches = {k: output_cache(m(input_ids=ids[:, :-1], use_cache=True)) for k, m in models.items()}
    step = ids[:, -1:]
    kvs = {k: {cache_keyword(m): caches[k]} for k, m in models.items()}  # (looked up once, not timed)
    fns = {k: (lambda m=m, kv=kvs[k]: m(input_ids=step, use_cache=True, **kv)) for k, m in models.items()}
    return interleaved_gpu(fns, rounds, 1, after=lambda k: caches[k].crop(-1))


def _graph_decode(models: dict, ids: torch.Tensor, rounds: int) -> dict:
    """One decode step on a static cache holding ``ids[:, :-1]``, replayed from a CUDA graph: the step
    (its position passed, so nothing in the forward reads a GPU value on the CPU) and its undo."""
    from transformers import StaticCache

    from lordba._util.modules import cache_keyword

    fns, calls = {}, 10
    step = ids[:, -1:]
    position = torch.tensor([ids.shape[1] - 1], device=ids.device)
    for k, m in models.items():
        inner = m.get_base_model() if hasattr(m, "get_base_model") else m
        cache = StaticCache(config=inner.config, max_cache_len=ids.shape[1] + 8)
        kv = {cache_keyword(m): cache}
        m(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, **kv)

        def once(m: nn.Module = m, cache: StaticCache = cache, kv: dict = kv) -> None:
            m(
                input_ids=step,
                use_cache=True,
                **kv,
                cache_position=position,
                position_ids=position[None],
            )
            for layer in cache.layers:
                layer.cumulative_length.sub_(1)

        fns[k] = captured(once, calls)
    return interleaved_gpu(fns, rounds, calls, dict.fromkeys(fns, calls))


def build(name: str, device: str, errors: dict[str, str]) -> dict[str, nn.Module] | None:
    """The three variants of model ``name`` (``tiny``: a smoke run's), or ``None`` (recorded in ``errors``)."""
    try:
        # LoRDBA (int8 scales, loaded packed from its file) and PEFT LoRA (factors in bfloat16) r = 16
        return variants(_base(name, device), RANK, "none", autocast_adapter_dtype=False)
    except Exception:
        errors[f"{name} build"] = traceback.format_exc(limit=-3)
        return None


def model_rows(
    name: str, models: dict, rounds: int, errors: dict[str, str], done: Callable[[dict], None], graph: bool = False
) -> None:
    """Measure model ``name``'s variants, passing each row to ``done`` as it is measured: the eager
    cases and the reference check, or (``graph``) the decode step replayed from a CUDA graph. A case
    that fails is recorded in ``errors`` (its traceback's end) and the others still run."""
    device = models["base"].device
    vocab = min(1000, models["base"].config.vocab_size)
    g = torch.Generator().manual_seed(2)
    prompt = PROMPT if name in MODEL_SHAPES else 16
    cases = [("prefill", _prefill, 1), ("prefill", _prefill, 4), ("decode", _decode, 1), ("decode", _decode, 16)]
    if graph:
        cases = [("decode", _graph_decode, 1)]
    for kind, fn, batch in cases:
        ids = torch.randint(0, vocab, (batch, prompt + (kind == "decode")), generator=g).to(device)
        label = f"{kind} {batch}×{prompt}"
        try:
            with torch.inference_mode():
                timed = fn(models, ids, rounds)
            check = (
                _check(models["lordba"], ids[:1, :prompt]) if (kind, batch, graph) == ("prefill", 1, False) else None
            )
            done(_row(name, label, "graph" if graph else "eager", timed, check))
        except Exception:
            errors[f"{name} {label}{' graph' if graph else ''}"] = traceback.format_exc(limit=-3)
