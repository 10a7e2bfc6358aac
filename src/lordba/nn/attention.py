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
goes to transformers' ``sdpa`` unchanged. :func:`use_packed_gqa` switches a model to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lordba_sdpa"
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
    if q_len != 1 or groups <= 1 or dropout != 0.0 or not mask_ok or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    packed = query.reshape(b, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


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
    (``eager``, flash, flex) are left as they are."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(inner, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not callable(getattr(inner, "set_attn_implementation", None)):
        return False
    register()
    inner.set_attn_implementation(NAME)
    return getattr(inner.config, "_attn_implementation", None) == NAME
