"""``lordba.nn.attention``: the packed grouped-query attention equals transformers' ``sdpa`` (eager,
and compiled, where transformers copies the key/value heads), delegates every other case, and is
switched on only for models on ``sdpa``."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lordba.nn import attention
from lordba.nn.attention import NAME, packed_gqa_forward, use_packed_gqa

from conftest import tiny_llama


class _Attn(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True
    training = False


class _Repeated(_Attn):
    num_key_value_groups = 1  # the key/value heads come repeated


def _inputs(q_len: int, kv_len: int = 20, heads: int = 6, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, q_len, dim, generator=g)
    k, v = torch.randn(2, 2, kv_len, dim, generator=g), torch.randn(2, kv_heads, kv_len, dim, generator=g)
    mask = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool)
    mask[0, ..., 13:] = False  # a static cache's empty tail
    mask[1, ..., :4] = False  # left padding
    return q, k, v, mask


@pytest.mark.parametrize("q_len", [1, 5])
def test_equals_sdpa_with_repeated_heads_eager_and_compiled(q_len):
    q, k, v, mask = _inputs(q_len)
    module = _Attn()
    want, _ = sdpa_attention_forward(
        _Repeated(), q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask, scaling=0.3
    )
    got, weights = packed_gqa_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None and got.shape == (2, q_len, 6, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(packed_gqa_forward, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(module, q, k, v, mask, scaling=0.3)[0], want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_a_mask_with_a_head_axis_or_dropout_goes_to_sdpa(monkeypatch):
    calls = []
    import transformers.integrations.sdpa_attention as sdpa

    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, mask = _inputs(1)
    packed_gqa_forward(_Attn(), q, k, v, mask.expand(2, 6, 1, 20))
    packed_gqa_forward(_Attn(), q, k, v, mask, dropout=0.1)
    assert calls == [1, 1]
    packed_gqa_forward(_Attn(), q, k, v, mask)
    assert calls == [1, 1]


def test_use_packed_gqa_switches_sdpa_models_only_and_keeps_greedy_tokens():
    model = tiny_llama(0)
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([[5, 17, 3, 44, 9]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(input_ids=ids, cache_implementation="static", **kw)
        assert use_packed_gqa(model) and model.config._attn_implementation == NAME
        assert use_packed_gqa(model)  # idempotent
        got = model.generate(input_ids=ids, cache_implementation="static", **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)
    eager = tiny_llama(0)
    eager.set_attn_implementation("eager")
    assert not use_packed_gqa(eager) and eager.config._attn_implementation == "eager"
    assert attention._REGISTERED


def test_use_packed_gqa_leaves_a_model_sharing_the_config_and_the_config_itself_on_sdpa():
    """transformers keeps the config a model is built from: switching one of two models built from one config switched
    the other (and the user's config object) to lordba's attention too (its logits changed in the last bits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    config = LlamaConfig(**TINY)
    model, other = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    assert config._attn_implementation == "sdpa" and other.config is config
    assert use_packed_gqa(model)
    assert config._attn_implementation == "sdpa" and other.config._attn_implementation == "sdpa"
    attentions = [m for m in model.modules() if hasattr(m, "num_key_value_groups")]
    assert attentions and all(m.config is model.config for m in attentions)  # every module holds the model's copy
    assert model.config is not config and model.config._attn_implementation == NAME
    assert model.config.to_dict() == config.to_dict()  # a copy: every saved field the same


def test_a_reduced_cache_keeps_its_dtype_and_decodes_close_to_float32():
    from transformers import StaticCache

    from lordba.errors import ConfigError
    from lordba.nn.attention import reduced_cache

    model = tiny_llama(0)
    model.set_attn_implementation("sdpa")
    use_packed_gqa(model)
    ids = torch.tensor([[5, 17, 3, 44, 9, 21, 60, 2, 11]])
    with pytest.raises(ConfigError, match="not an initialized static layer"):
        reduced_cache(StaticCache(config=model.config, max_cache_len=16).layers, torch.float16)
    logits = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            cache = StaticCache(config=model.config, max_cache_len=16)
            out = [model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True).logits[0, -1]]
            kept = reduced_cache(cache.layers, dtype)
            assert all(k.dtype == dtype and v.dtype == dtype for k, v in kept)
            assert len({t.untyped_storage().data_ptr() for kv in kept for t in kv}) == 1  # one buffer
            for i in range(4, ids.shape[1]):  # decode: the op (or SDPA) reads the reduced cache
                out.append(model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits[0, -1])
            assert all(layer.keys.dtype == dtype for layer in cache.layers)
            logits[dtype] = torch.stack(out)
    torch.testing.assert_close(logits[torch.float16], logits[torch.float32], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32], rtol=2e-2, atol=2e-2)
    assert not torch.equal(logits[torch.float16], logits[torch.float32])


def test_value_heads_of_another_size_decode_as_sdpa_does():
    """DeepSeek-V2/V3-style attention (value heads smaller than the query/key heads): the single-token step
    went to the op (which wants one shape for k and v) or reshaped the output to the query's head size, and
    raised; it goes to transformers' ``sdpa``."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from lordba import kernels

    kernels.cpu_available()
    q = torch.randn(2, 6, 1, 24, generator=torch.Generator().manual_seed(1))
    k, v = torch.randn(2, 2, 10, 24), torch.randn(2, 2, 10, 16)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    want, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.2)
    torch.testing.assert_close(packed_gqa_forward(_Attn(), q, k, v, mask, scaling=0.2)[0], want)
    config = DeepseekV3Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2,
        max_position_embeddings=128, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 17, 3, 44, 9]])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        want_tokens = model.generate(input_ids=ids, **kw)
        assert use_packed_gqa(model)
        assert torch.equal(model.generate(input_ids=ids, **kw), want_tokens)


def test_a_position_bias_is_added_as_sdpa_adds_it():
    """transformers' ``sdpa`` adds a ``position_bias`` to the scores (Inkling's relative positions); the
    single-token step dropped it and returned attention without it (a wrong output, silently)."""
    from lordba import kernels

    kernels.cpu_available()
    q, k, v, mask = _inputs(1)
    bias = 3 * torch.randn(2, 6, 1, 20, generator=torch.Generator().manual_seed(2))
    want, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.3, position_bias=bias)
    got, _ = packed_gqa_forward(_Attn(), q, k, v, mask, scaling=0.3, position_bias=bias)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, packed_gqa_forward(_Attn(), q, k, v, mask, scaling=0.3)[0])


def test_a_single_token_step_that_needs_gradients_gets_them():
    """The decode attention op has no backward: a one-token step of a model switched to :data:`NAME` with
    gradients on ran it anyway, and ``backward`` left the query, keys and values without gradients
    (silently); such a step is SDPA's and its gradients equal transformers' ``sdpa``'s."""
    from lordba import kernels

    kernels.cpu_available()
    q, k, v, mask = _inputs(1)
    grads = []
    for forward in (packed_gqa_forward, sdpa_attention_forward):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        module = _Attn() if forward is packed_gqa_forward else _Repeated()
        kv = leaves[1:] if forward is packed_gqa_forward else [t.repeat_interleave(3, 1) for t in leaves[1:]]
        out, _ = forward(module, leaves[0], *kv, mask, scaling=0.3)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        assert all(t.grad is not None for t in leaves)
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
