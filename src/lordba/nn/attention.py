"""Attention for decoding on a CPU: grouped-query attention without copying the KV cache.

transformers' ``sdpa`` attention repeats every key/value head ``groups`` times before calling
``scaled_dot_product_attention`` whenever a mask is given and the step is being compiled or exported
(``repeat_kv``); in eager decoding it packs the query heads instead. On a static cache that copy
is of the *whole* cache, every layer, every token: SmolLM2-135M (9 query heads, 3 key/value heads)
with a 640-position cache copies 2.9 MB per layer, 435 µs of a ~600 µs layer on this project's CPU
(AOTInductor profile, one thread) — more than half the decode step.

:data:`NAME` (``"lordba_sdpa"``) is transformers' ``sdpa`` with the query heads of one key/value
head packed into the query-length axis for a single-token query, compiled or not: ``[b, heads, 1, d]``
→ ``[b, kv_heads, groups, d]``, one SDPA call over the cache as it is (the mask, shared by the heads
and the one query position, broadcasts). Everything else (prefill, masks with a head axis, dropout)
goes to transformers' ``sdpa`` unchanged, as do value heads of another size than the query's (DeepSeek-V2/V3,
MiniCPM3) and the arguments in :data:`_SDPA_TERMS` (a position bias added to the scores).
:func:`use_packed_gqa` switches a model to it.

On the CPU, with the compiled kernels loaded, the single-token case runs ``lordba::decode_attention``
(every key and value row read once for the query heads that share it; float32 arithmetic; no gradient: a
step that needs one is SDPA's) instead of SDPA, over a float32 cache or one kept in float16 / bfloat16
(:func:`reduced_cache`; other paths read such a cache converted to the query's dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lordba import kernels
from lordba._util.arena import empty_views
from lordba._util.modules import own_config

NAME = "lordba_sdpa"
# Arguments of transformers' ``sdpa`` that change what it computes (soft-capping, which it refuses; an additive
# position bias: Inkling; a paged cache): a call that passes one goes to it.
_SDPA_TERMS = ("softcap", "position_bias", "cache")
_REGISTERED: list[bool] = []


def packed_gqa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [b, heads, q, d]``, ``key``/``value``
    ``[b, kv_heads, s, d]``; returns ``([b, q, heads, d], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, dim = query.shape
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    plain = value.shape[-1] == dim and all(kwargs.get(name) is None for name in _SDPA_TERMS)
    if q_len != 1 or dropout != 0.0 or not mask_ok or not plain:
        key, value = _as_query_dtype(query, key, value)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    packed = query.reshape(b, heads // groups, groups, dim)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    on_cpu = query.device.type == "cpu" and query.dtype == torch.float32 and not grad  # the op has no backward
    op = kernels.decode_attention_op() if on_cpu else None
    mask_fits = attention_mask is None or (
        attention_mask.shape[-2] == 1
        and attention_mask.shape[-1] == key.shape[-2]
        and attention_mask.shape[0] in (1, b)
    )
    if op is not None and mask_fits:
        scale = scaling if scaling is not None else dim**-0.5
        out = op(packed, key, value, attention_mask, scale)
    else:
        key, value = _as_query_dtype(query, key, value)
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def _as_query_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``key`` and ``value`` in ``query``'s dtype: a reduced-precision cache (:func:`reduced_cache`)
    read by SDPA, which wants one dtype."""
    if key.dtype == query.dtype:
        return key, value
    return key.to(query.dtype), value.to(query.dtype)


def reduced_cache(layers: list, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keep the keys and values of initialized static cache ``layers`` (transformers' ``StaticLayer``)
    in ``dtype`` (float16: llama.cpp's default KV cache; half the bytes that decoding reads every
    token): each layer's tensors are replaced and its ``update`` rounds new states to ``dtype``. The
    replacements are views of one buffer, in huge pages where the OS gives them
    (:func:`~lordba._util.arena.huge_page_buffer`: every token reads the whole cache). Returns the new
    ``(keys, values)`` per layer (callers that registered the old tensors as buffers register these
    instead). Attention reads them through :func:`packed_gqa_forward`.

    Raises:
        ConfigError: a layer is not initialized or has no ``keys``/``values``.
    """
    from lordba.errors import ConfigError

    for i, layer in enumerate(layers):
        if not getattr(layer, "is_initialized", False) or not hasattr(layer, "keys"):
            raise ConfigError(f"reduced_cache: cache layer {i} is not an initialized static layer")
    specs = [(t.shape, dtype) for layer in layers for t in (layer.keys, layer.values)]
    views = empty_views(specs, layers[0].keys.device, align=64, huge_pages=True) if layers else []
    replaced = []
    with torch.no_grad():
        for i, layer in enumerate(layers):  # one layer at a time: each old tensor is freed as it is replaced
            views[2 * i].copy_(layer.keys)  # rounded to dtype as copied
            views[2 * i + 1].copy_(layer.values)
            if layer.keys.dtype != dtype:
                layer.update = _rounding_update(layer, type(layer).update)
            layer.keys, layer.values = views[2 * i], views[2 * i + 1]
            replaced.append((layer.keys, layer.values))
    return replaced


def _rounding_update(layer: object, update: object) -> object:
    def rounded(key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        dtype = layer.keys.dtype
        return update(layer, key_states.to(dtype), value_states.to(dtype), *args, **kwargs)

    return rounded


def register() -> None:
    """Register :data:`NAME` with transformers' attention and mask interfaces (once)."""
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_gqa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _REGISTERED.append(True)


def use_packed_gqa(model: nn.Module) -> bool:
    """Switch a transformers model (or a wrapper with ``get_base_model``) that uses ``sdpa`` attention
    to :data:`NAME`; returns whether it now uses it. Models on other attention implementations
    (``eager``, flash, flex) are left as they are. The model gets its own copy of the config first
    (:func:`~lordba._util.modules.own_config`): one it shared with another model switched that one too."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(inner, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not callable(getattr(inner, "set_attn_implementation", None)):
        return False
    register()
    own_config(inner)  # (a config shared with another model: that one stays on sdpa)
    inner.set_attn_implementation(NAME)
    return getattr(inner.config, "_attn_implementation", None) == NAME
