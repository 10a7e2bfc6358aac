"""``lordba.nn.decode``: generating with a static cache and an inductor-compiled decode step gives the
eager greedy tokens and (allclose) logits on a q4 base, with a LoRDBA adapter and with the adapter
disabled; a failing compiler falls back to eager with a warning; cache lengths are bucketed."""

import logging

import pytest
import torch

from lordba.errors import ConfigError
from lordba.nn.decode import MIN_CACHE, FastDecode, cache_length

from conftest import tiny_llama, tiny_q4

PROMPT = torch.tensor([[5, 17, 3, 44, 9, 21, 60, 2]])
NEW = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def greedy(model, decode: FastDecode | None = None):
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    kw.update(attention_mask=torch.ones_like(PROMPT), min_new_tokens=NEW)
    with torch.no_grad():
        if decode is None:
            out = model.generate(input_ids=PROMPT, max_new_tokens=NEW, **kw)
        else:
            out = decode.generate(PROMPT, NEW, **kw)
    return out.sequences, torch.stack(out.logits)


def assert_same(got, want, tol=1e-4):
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol)


def test_compiled_decode_equals_eager_on_the_q4_base_and_a_new_prompt_length_reuses_it():
    base = tiny_q4(adapter=False)
    want = greedy(base)
    decode = FastDecode(base)
    assert_same(greedy(base, decode), want)
    assert decode.compiled and decode.failure is None and decode.compile_seconds > 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the step did compile
    longer = torch.cat([PROMPT, PROMPT], dim=1)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(longer))
    with torch.no_grad():
        got = decode.generate(longer, NEW, **kw)
        assert torch.equal(got, base.generate(input_ids=longer, max_new_tokens=NEW, **kw))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # same cache length: no recompile


def test_compiled_decode_equals_eager_with_the_adapter_enabled_and_disabled():
    lm = tiny_q4(adapter=True)
    want = greedy(lm)
    with lm.disable_adapter():
        want_off = greedy(lm)
    assert not torch.equal(want[0], want_off[0])  # the adapter changes the tokens: equality means something
    decode = FastDecode(lm)
    assert_same(greedy(lm, decode), want)
    with lm.disable_adapter():
        assert_same(greedy(lm, decode), want_off)  # its own graph, not the adapter's
    assert_same(greedy(lm, decode), want)  # and back
    assert decode.compiled and decode.failure is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # one graph per routing state


def test_compiled_decode_with_bfloat16_inputs_keeps_the_tokens():
    """``fast`` (the default compute): one token's inputs are rounded to bfloat16, so ulp-level
    differences between the compiled and the eager graph can flip a rounding — the tokens stay the
    eager ones and the logits agree to bfloat16's precision."""
    lm = tiny_q4(adapter=True, compute="fast")
    assert_same(greedy(lm, FastDecode(lm)), greedy(lm), tol=5e-3)


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    base = tiny_q4(adapter=False)
    want = greedy(base)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    decode = FastDecode(base)
    with caplog.at_level(logging.WARNING, logger="lordba.decode"):
        got = greedy(base, decode)
    assert_same(got, want)
    assert not decode.compiled and "no C++ compiler here" in decode.failure
    assert "decoding eagerly" in caplog.text
    assert decode.generate_kwargs(20) == {}


def test_cache_length_buckets_and_bad_input():
    assert cache_length(1) == MIN_CACHE
    assert cache_length(257) == 512 and cache_length(512) == 512
    assert cache_length(300, limit=400) == 400  # the model's limit, when it holds the call
    assert cache_length(5000, limit=4096) == 8192  # beyond the limit: transformers warns and goes on, as we do
    with pytest.raises(ConfigError, match="positive"):
        cache_length(0)
    with pytest.raises(ConfigError, match="compile mode"):
        FastDecode(tiny_llama(0), mode="reduce-overhead")


def test_the_cache_is_held_to_the_context_a_gpt2_config_names():
    """GPT-2's config names its context ``n_positions`` (no ``max_position_embeddings``): a call of 300
    positions on a 400-position model gets a cache of 400 (as a Llama's would), never 512."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=400))
    assert FastDecode(gpt2).generate_kwargs(300)["max_cache_len"] == 400


def test_a_sliding_window_model_decodes_eagerly_instead_of_recompiling_every_token(caplog):
    """transformers' static cache keeps a sliding-window layer's length in a Python int, which the compiled step is
    specialized on: it recompiled every token (a full compile each) until dynamo's limit, then ran eagerly anyway.
    Such a model is not compiled: the fallback's warning names why, and the tokens are eager's."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = MistralConfig(**sizes, num_key_value_heads=2, sliding_window=6, attn_implementation="sdpa")
    model = MistralForCausalLM(config).eval()
    want = greedy(model)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    decode = FastDecode(model)
    with caplog.at_level(logging.WARNING, logger="lordba.decode"):
        assert not decode.prepare(20)
        assert_same(greedy(model, decode), want)
    assert not decode.compiled and "sliding-window" in decode.failure and "decoding eagerly" in caplog.text
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled


def test_a_compile_that_fails_after_prepare_falls_back_to_eager_in_generate(monkeypatch, caplog):
    """prepare compiled one graph; a later generate that needs another (here: the adapter disabled, its own graph)
    and whose compile fails raised the compiler's error, where the docs promise eager decoding: generate falls back,
    gives eager's tokens, and streams each token once."""
    from torch._inductor import compile_fx

    lm = tiny_q4(adapter=True)
    with lm.disable_adapter():
        want_off = greedy(lm)
    decode = FastDecode(lm)
    assert decode.prepare(PROMPT.shape[1] + NEW)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.reshape(-1).tolist())

        def end(self):
            seen.append("end")

    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, min_new_tokens=NEW)
    # (the config's own patch: monkeypatch's undo left suppress_errors hidden, and every later torch.compile failed)
    quiet = torch._dynamo.config.patch(suppress_errors=False)
    with quiet, lm.disable_adapter(), caplog.at_level(logging.WARNING, logger="lordba.decode"), torch.no_grad():
        out = decode.generate(PROMPT, NEW, attention_mask=torch.ones_like(PROMPT), streamer=Streamer(), **kw)
    assert_same((out.sequences, torch.stack(out.logits)), want_off)
    assert not decode.compiled and "no C++ compiler here" in decode.failure and "decoding eagerly" in caplog.text
    assert seen == [PROMPT[0].tolist()] + [[t] for t in want_off[0][0, PROMPT.shape[1] :].tolist()] + ["end"]


def test_an_error_of_the_call_itself_is_raised_and_decoding_stays_compiled(monkeypatch, caplog):
    """A call the eager model refuses too (an unknown adapter name) is the caller's error, not the compiler's: it is
    raised, with no warning blaming compilation, and the decoder keeps compiling (the fallback turned compiled
    decoding off for good: every later call of the process decoded eagerly)."""
    from lordba.errors import AdapterStateError

    lm = tiny_q4(adapter=True)
    decode = FastDecode(lm)
    monkeypatch.setattr(decode, "prepare", lambda tokens: True)  # "compiled" without compiling
    with caplog.at_level(logging.WARNING, logger="lordba.decode"), pytest.raises(AdapterStateError, match="nope"):
        decode.generate(PROMPT, NEW, adapter_names=["nope"], do_sample=False, pad_token_id=0)
    assert decode.compiled and decode.failure is None and "decoding eagerly" not in caplog.text


def test_the_rerun_after_a_compile_failure_restores_the_accelerators_generator_too(monkeypatch):
    """A sampled call rerun eagerly after its compile failed must draw what the compiled run would have: on CUDA
    sampling draws from the device's generator, which was not put back (the rerun drew another stream; no GPU here:
    CUDA's generator calls are recorded)."""
    from lordba.nn.decode import rng_state, set_rng_state

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state, device)))
    cuda = torch.device("cuda", 1)
    state = rng_state(cuda)
    cpu_draw = torch.rand(4)
    set_rng_state(cuda, state)
    assert torch.equal(torch.rand(4), cpu_draw)
    assert calls[0] == ("get", cuda) and calls[1][0] == "set" and torch.equal(calls[1][1], torch.ones(3))
    assert calls[1][2] == cuda and len(calls) == 2
    calls.clear()
    set_rng_state(torch.device("cpu"), rng_state(torch.device("cpu")))
    assert calls == []


def test_a_fallback_drops_the_compiled_step_of_a_base_compiled_in_place():
    """With ``lm.base_model = torch.compile(lm.base_model)``, a fallback looked for transformers' compiled decode step
    on torch's wrapper, not on the model ``generate`` keeps it on: the failed step (its graphs, its static cache) stayed
    alive with the model."""
    lm = tiny_q4(adapter=True)
    lm.base_model = torch.compile(lm.base_model, backend="eager")
    decode = FastDecode(lm)
    inner = lm.base_model._orig_mod
    inner.__dict__.update(_compiled_call=object(), _last_compile_config=object())
    decode.fallback(RuntimeError("broken"))
    assert "_compiled_call" not in inner.__dict__ and "_last_compile_config" not in inner.__dict__
