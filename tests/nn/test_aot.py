"""``lordba.nn.aot``: the ahead-of-time compiled decode step on a tiny q4 model with a LoRDBA adapter
gives the eager greedy tokens and logits, reads the live model's tensors (no copy), is compiled once
per graph (a second decoder loads the package) and again when the graph changes (the adapter's
scaling), never reusing a stale package."""

import mmap

import pytest
import torch

from lordba._util.arena import HUGE_PAGE
from lordba.errors import ConfigError
from lordba.kernels import cpu_available
from lordba.nn.adapter import PackedAdapter
from lordba.nn.aot import AotDecode
from lordba.nn.decode import token_processors

from conftest import locked_elsewhere, tiny_q4

PROMPT = torch.tensor([[5, 17, 3, 44, 9, 21, 60, 2]])
NEW = 6

pytestmark = pytest.mark.skipif(not cpu_available(), reason="CPU kernels needed")


def eager(model):
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW,
                             min_new_tokens=NEW, **kw)  # fmt: skip
    return out.sequences, torch.stack(out.logits)[:, 0]


def test_compiled_step_gives_the_eager_tokens_and_logits_and_reads_the_live_tensors(tmp_path):
    lm = tiny_q4(adapter=True)
    want_ids, want_logits = eager(lm)
    base_ids, _ = eager(tiny_q4(adapter=False))
    assert not torch.equal(want_ids, base_ids)  # the adapter matters
    lines = []
    decode = AotDecode(lm, folder=tmp_path, log=lines.append, kv_dtype="float32")
    held = [b for m in lm.modules() if isinstance(m, PackedAdapter) for b in m.buffers(recurse=False)]
    starts = {b.untyped_storage().data_ptr() for b in held}  # the adapter moved into one buffer, in a 2 MB page
    assert held and len(starts) == 1 and (not hasattr(mmap, "MADV_HUGEPAGE") or starts.pop() % HUGE_PAGE == 0)
    got = decode.generate(PROMPT, NEW, eos_token_id=[])  # the same values: the eager tokens
    assert torch.equal(got, want_ids) and len(lines) == 1 and decode.compile_seconds > 0
    decode.prepare(PROMPT.shape[1] + NEW)
    logits = [decode.prefill(PROMPT)]
    for token in want_ids[0, PROMPT.shape[1] : -1].tolist():
        logits.append(decode.step(token))
    torch.testing.assert_close(torch.stack(logits), want_logits, rtol=1e-4, atol=1e-4)
    step = decode.step_for
    mine = dict(lm.named_parameters(remove_duplicate=False))
    mine.update(lm.named_buffers(remove_duplicate=False))
    cache = {t.data_ptr() for layer in step.cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)}
    ptrs = {t.data_ptr() for t in mine.values()}
    assert len(step.constants) == len(cache) + len([t for t in step.constants.values() if t.data_ptr() in ptrs])
    assert all(t.data_ptr() in ptrs | cache for t in step.constants.values())  # the model's own tensors, no copies


def test_the_default_float16_cache_keeps_the_tokens_and_the_logits_close(tmp_path):
    """The default KV cache is float16 (half the bytes attention reads per token): the greedy tokens
    are the eager model's and the logits within float16's rounding of the cache."""
    lm = tiny_q4(adapter=True)
    want_ids, want_logits = eager(lm)
    decode = AotDecode(lm, folder=tmp_path)
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), want_ids)
    assert {t.dtype for layer in decode.step_for.cache.layers for t in (layer.keys, layer.values)} == {torch.float16}
    decode.prepare(PROMPT.shape[1] + NEW)
    logits = [decode.prefill(PROMPT)]
    for token in want_ids[0, PROMPT.shape[1] : -1].tolist():
        logits.append(decode.step(token))
    got = torch.stack(logits)
    assert not torch.equal(got, want_logits)  # the cache is rounded ...
    torch.testing.assert_close(got, want_logits, rtol=5e-3, atol=5e-3)  # ... to float16's precision


@pytest.mark.long
def test_a_second_decoder_loads_the_package_and_a_changed_graph_compiles_anew(tmp_path, monkeypatch):
    folder = tmp_path  # its own: a parallel run may give another test of this module to another worker
    lm = tiny_q4(adapter=True)
    first = AotDecode(lm, folder=folder, kv_dtype="float32")
    assert torch.equal(first.generate(PROMPT, NEW, eos_token_id=[]), eager(lm)[0]) and first.compile_seconds > 0
    packages = sorted(folder.glob("step-*.pt2"))
    assert len(packages) == 1
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: pytest.fail("recompiled"))
    decode = AotDecode(lm, folder=folder, kv_dtype=torch.float32)
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), eager(lm)[0]) and decode.compile_seconds == 0
    monkeypatch.undo()
    for a in lm.adapter_modules("default").values():
        a.scaling = a.scaling * 2  # a constant of the graph: a new package, never the old one
    want = eager(lm)[0]
    decode = AotDecode(lm, folder=folder, kv_dtype="float32")
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), want)
    assert len(sorted(folder.glob("step-*.pt2"))) == 2 and not list(folder.glob(".*"))  # no temporary file left


@pytest.mark.long
def test_one_decoder_follows_a_disabled_adapter_and_a_new_scaling(tmp_path):
    """The same decoder after the adapter state changed (a ``disable_adapter`` block, a new scaling) decodes
    for the new state, as eager ``generate`` does (the step it exported before would mix the two: an eager
    prefill of the new state, compiled tokens of the old); an unchanged state reuses its step."""
    lm = tiny_q4(adapter=True)
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), eager(lm)[0])
    with lm.disable_adapter():
        want_off = eager(lm)[0]
        assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), want_off)
    exported = decode.export_seconds
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), eager(lm)[0])  # its step again
    assert decode.export_seconds == exported and len(list(tmp_path.glob("step-*.pt2"))) == 2
    for a in lm.adapter_modules("default").values():
        a.scaling = a.scaling * 2
    want = eager(lm)[0]
    assert not torch.equal(want, want_off)
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), want)
    assert len(list(tmp_path.glob("step-*.pt2"))) == 3 and len(decode._steps) == 1  # the old state's: dropped


def test_sampling_with_a_seed_gives_the_eager_tokens_under_the_models_generation_config(tmp_path):
    """Sampled with the same seed, the compiled step gives eager ``generate``'s tokens: the same processors
    (transformers' default top-k of 50 where none is set, the model's generation config's top-k and
    repetition penalty, then the caller's temperature / top-p) and the same draws; greedy decoding applies
    the repetition penalty too."""
    lm = tiny_q4(adapter=True)
    config = lm.get_base_model().generation_config
    config.eos_token_id = None  # (no stop, no suppressed token: every sampled token counts)
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    n = 12

    def both(**kw):
        got, want = [], []
        for seed in range(3):
            torch.manual_seed(seed)
            with torch.no_grad():
                want.append(lm.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=n,
                                        pad_token_id=0, **kw))  # fmt: skip
            torch.manual_seed(seed)
            got.append(decode.generate(PROMPT, n, **kw))
        return torch.cat(got), torch.cat(want)

    got, want = both(do_sample=True, temperature=1.0)
    assert torch.equal(got, want)
    got, want = both(do_sample=True, temperature=0.7, top_p=0.9)
    assert torch.equal(got, want)
    config.top_k, config.repetition_penalty = 5, 1.3
    greedy = both(do_sample=False)
    assert torch.equal(*greedy) and torch.equal(*both(do_sample=True, temperature=1.5))
    config.repetition_penalty = None
    assert not torch.equal(greedy[1], both(do_sample=False)[1])  # the penalty changed the greedy tokens


@pytest.mark.long
def test_min_new_tokens_and_a_given_repetition_penalty_are_applied_as_generate_does(tmp_path):
    """``min_new_tokens`` (given, or the generation config's ``min_new_tokens`` / ``min_length``) keeps the eos
    from being chosen before, and a ``repetition_penalty`` given to the call applies: both were swallowed (the
    tokens stopped at the first eos, the penalty changed nothing), silently other tokens than ``generate``'s."""
    lm = tiny_q4(adapter=True)
    config = lm.get_base_model().generation_config
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    n = 10

    def both(**kw):
        with torch.no_grad():
            want = lm.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=n,
                               do_sample=False, pad_token_id=0, **kw)  # fmt: skip
        return decode.generate(PROMPT, n, do_sample=False, pad_token_id=0, **kw), want

    plain = both(eos_token_id=[])[1]
    eos = int(plain[0, PROMPT.shape[1] + 2])  # the third new token
    got, want = both(eos_token_id=eos, min_new_tokens=6)
    assert want.shape[1] > PROMPT.shape[1] + 3 and torch.equal(got, want)
    got, want = both(eos_token_id=[], repetition_penalty=2.0)
    assert not torch.equal(want, plain) and torch.equal(got, want)
    config.eos_token_id, config.min_new_tokens = eos, 6
    got, want = both()
    assert want.shape[1] > PROMPT.shape[1] + 3 and torch.equal(got, want)
    config.min_new_tokens, config.min_length = None, PROMPT.shape[1] + 5
    got, want = both()
    assert want.shape[1] > PROMPT.shape[1] + 3 and torch.equal(got, want)


@pytest.mark.long
def test_one_decoder_used_from_two_threads_gives_each_its_eager_tokens(tmp_path):
    """Two threads generating with one decoder each get their prompt's eager tokens: the cache, the step and the
    position are the decoder's, so interleaved calls decoded each other's positions (a silent wrong result)."""
    import threading

    lm = tiny_q4(adapter=True)
    prompts = [PROMPT, torch.tensor([[8, 1, 99, 4]])]
    with torch.no_grad():
        want = [lm.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=20, do_sample=False,
                            eos_token_id=[], pad_token_id=0) for p in prompts]  # fmt: skip
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    assert decode.prepare(30)
    got, errors = {}, []

    def work(i):
        try:
            for k in range(4):
                got[i, k] = decode.generate(prompts[i], 20, eos_token_id=[])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 8
    assert all(torch.equal(ids, want[i]) for (i, _), ids in got.items())


@pytest.mark.long
def test_a_gemma_style_model_with_sliding_window_layers_and_soft_capping_decodes_as_eager(tmp_path):
    """A model whose config has sliding-window layers (Gemma-2: alternating sliding / full attention, attention and
    final soft-capping) is exported through transformers' hybrid-cache wrapper: its tokens past the window are
    eager ``generate``'s (it failed with an AttributeError on the wrapper's ``static_cache`` and decoded eagerly)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=101, hidden_size=40, intermediate_size=52, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=10, query_pre_attn_scalar=10,
                          max_position_embeddings=64, sliding_window=6)  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    assert "sliding_attention" in config.layer_types and config.attn_logit_softcapping
    n = 16  # the prompt's 8 and 16 new tokens: well past the window of 6
    with torch.no_grad():
        want = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=n,
                              do_sample=False, eos_token_id=[], pad_token_id=0)  # fmt: skip
    decode = AotDecode(model, folder=tmp_path, kv_dtype="float32")
    assert decode.prepare(PROMPT.shape[1] + n), decode.failure
    assert torch.equal(decode.generate(PROMPT, n, eos_token_id=[]), want)


def test_a_step_reading_a_tensor_the_model_does_not_hold_is_refused_naming_it_before_any_compile(tmp_path):
    """Phi-3's long RoPE (Phi-3-mini-128k, Phi-3.5) keeps ``long_inv_freq`` in a plain attribute, which the export
    captures as a constant of the step; the package holds no tensor and reads the model's live, so it could never
    load it. The decoder refuses it naming it, and compiles nothing (it compiled a package, then failed with "reads
    tensors the model no longer has: ['_tensor_constant0']")."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 5, "long_factor": [4.0] * 5,
            "original_max_position_embeddings": 16}  # fmt: skip
    config = Phi3Config(vocab_size=101, hidden_size=40, intermediate_size=52, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                        eos_token_id=2, rope_scaling=rope)  # fmt: skip
    decode = AotDecode(Phi3ForCausalLM(config).eval(), folder=tmp_path, kv_dtype="float32")
    assert not decode.prepare(PROMPT.shape[1] + NEW)
    assert "rotary_emb" in decode.failure and "no parameter or buffer of the model" in decode.failure, decode.failure
    assert decode.compile_seconds == 0 and not list(tmp_path.glob("*.pt2"))


@pytest.mark.long
def test_a_damaged_package_is_compiled_again_never_loaded(tmp_path):
    """A package in the cache with a flipped byte in its compiled code (which AOTInductor's loader does not
    check) or cut short is not loaded: it is compiled again, and the step gives the eager tokens."""
    import zipfile

    lm = tiny_q4(adapter=True)
    want = eager(lm)[0]
    first = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    assert torch.equal(first.generate(PROMPT, NEW, eos_token_id=[]), want)
    path = first.step_for.path
    good = path.read_bytes()
    code = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(".so"))
    start = code.header_offset + 30 + len(code.filename.encode()) + len(code.extra)  # the entry's bytes (stored)
    for damaged in (good[: start + code.file_size // 2] + bytes([good[start + code.file_size // 2] ^ 0xFF])
                    + good[start + code.file_size // 2 + 1 :], good[: len(good) // 2]):  # fmt: skip
        path.write_bytes(damaged)
        lines = []
        decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32", log=lines.append)
        assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), want) and decode.compiled
        assert decode.compile_seconds > 0 and "damaged" in lines[0] and path.read_bytes() != damaged


@pytest.mark.long
def test_a_compile_holds_a_lock_and_a_package_that_does_not_load_is_compiled_again(tmp_path, monkeypatch):
    """Inductor writes a graph's files in its shared cache under names of the graph's hash, not atomically:
    a compile holds a lock on that cache (another process's ``flock`` is refused meanwhile). A package whose
    entries' CRCs are right but that does not load (an empty ``*_metadata.json``: what two processes compiling
    one graph at once packaged) is compiled again, and the step gives the eager tokens."""
    import zipfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    real, held = torch._inductor.aoti_compile_and_package, []

    def probe(*args, **kwargs):
        held.append(locked_elsewhere(cache_dir()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", probe)
    lm = tiny_q4(adapter=True)
    want = eager(lm)[0]
    first = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    assert torch.equal(first.generate(PROMPT, NEW, eos_token_id=[]), want) and held == [True]
    path = first.step_for.path
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    assert any(info.filename.endswith("_metadata.json") for info, _ in entries)
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, b"" if info.filename.endswith("_metadata.json") else data)
    lines = []
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32", log=lines.append)
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), want) and decode.compile_seconds > 0
    assert "does not load" in lines[0] and held == [True, True]


def test_bad_calls_are_refused():
    lm = tiny_q4(adapter=True)
    decode = AotDecode(lm, folder=None)
    with pytest.raises(ConfigError, match="prepare"):
        decode.step(3)
    with pytest.raises(ConfigError, match="one sequence"):
        decode.generate(PROMPT.expand(2, -1), 3)
    padded = torch.ones_like(PROMPT)
    padded[0, :2] = 0  # left padding: eager generate masks those positions, the compiled step cannot
    with pytest.raises(ConfigError, match="attention_mask"):
        decode.generate(PROMPT, 3, attention_mask=padded)
    for other in ({"no_repeat_ngram_size": 2}, {"num_beams": 2}, {"output_logits": True}):
        with pytest.raises(ConfigError, match=f"does not apply {next(iter(other))}"):  # never dropped silently
            decode.generate(PROMPT, 3, pad_token_id=0, **other)
    with pytest.raises(ConfigError, match="round_to"):
        AotDecode(lm, round_to=0)
    with pytest.raises(ConfigError, match="KV cache dtype"):
        AotDecode(lm, kv_dtype="int8")
    inner = lm.get_base_model()
    assert token_processors(inner, True, 0.0, 1.0, None) == (False, [])  # temperature 0: greedy
    sample, warpers = token_processors(inner, True, 1.0, 0.5, None)
    scores = warpers(PROMPT, torch.tensor([[0.0, 5.0, 4.9]]))
    assert sample and torch.isinf(scores[0, [0, 2]]).all() and scores[0, 1] == 5.0  # top-p 0.5: one token left


def test_generation_config_settings_the_decoder_does_not_apply_are_refused_not_dropped():
    """A model whose generation config blocks repeated n-grams, suppresses tokens or asks for beams: AotDecode
    gave other tokens than generate, silently. It is refused before any work (lordba generate --aot then
    decodes eagerly); a setting at its no-op value (num_beams 1) is not."""
    inner = tiny_q4(adapter=True).get_base_model()
    config = inner.generation_config
    config.num_beams, config.typical_p = 1, 0.5  # no-op: one beam; typical_p acts when sampling only
    assert token_processors(inner, False, None, None, None) == (False, [])
    with pytest.raises(ConfigError, match="typical_p"):
        token_processors(inner, True, 1.0, None, None)
    for name, value in (("no_repeat_ngram_size", 2), ("suppress_tokens", [3]), ("num_beams", 2)):
        setattr(config, name, value)
        with pytest.raises(ConfigError, match=f"generation config sets {name}"):
            AotDecode(inner, folder=None).generate(PROMPT, 3)
        setattr(config, name, None)


@pytest.mark.long
def test_the_package_calls_the_ops_directly_with_the_proxy_executors_results(tmp_path, monkeypatch):
    """With the kernels' C shims the compiled step calls ``aoti_torch_cpu_q4_group`` & co. itself (no
    proxy executor, list arguments as pointer and length); without them (symbols not global) it boxes
    the calls: both give the same logits."""
    import zipfile

    from lordba.kernels.cpu import aoti

    def symbols(decode):
        archive = zipfile.ZipFile(decode.step_for.path)
        return b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".so"))

    lm = tiny_q4(adapter=True)
    logits = []
    for shims in (True, False):
        if not shims:
            monkeypatch.setattr(aoti, "c_shims", lambda: {})
        decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
        decode.prepare(PROMPT.shape[1] + 2)
        decode.prefill(PROMPT)
        logits.append(decode.step(7))
        code = symbols(decode)
        assert decode.step_for.grouped > 0  # q/k/v and gate/up: one q4_group call each (lordba.nn.aot_group)
        for name in ("q4_group", "q4_branch", "q4_linear", "decode_attention"):
            assert (f"aoti_torch_cpu_{name}".encode() in code) == shims
    assert len(list(tmp_path.glob("step-*.pt2"))) == 2  # the two are different packages
    assert torch.equal(logits[0], logits[1])


def test_positions_past_the_prepared_cache_are_refused_naming_it(tmp_path):
    """A step or a prefill past the cache :meth:`AotDecode.prepare` made raised the compiled step's (or the
    eager cache's) index error; the decoder's own error names the positions and the cache, and keeps both."""
    lm = tiny_q4(adapter=False)
    decode = AotDecode(lm, folder=tmp_path, round_to=8)
    assert decode.prepare(8)
    with pytest.raises(ConfigError, match="9 more position"):
        decode.prefill(torch.tensor([[5, 17, 3, 44, 9, 21, 60, 2, 7]]))
    decode.prefill(PROMPT[:, :4])
    for token in PROMPT[0, 4:].tolist():
        decode.step(token)
    assert decode.position == 8
    with pytest.raises(ConfigError, match="after 8 do not fit the 8-position cache"):
        decode.step(11)
    assert decode.position == 8
    decode.back()
    assert decode.step(2).shape[-1] == lm.config.vocab_size


@pytest.mark.long
def test_a_change_after_prepare_is_refused_by_prefill_not_decoded_with_the_old_step(tmp_path):
    """:meth:`AotDecode.prepare` exports the step for the adapter state of that moment. A change after it (a new
    scaling, the q4 ``compute``) before :meth:`~AotDecode.prefill` gave an eager prefill of the new state and compiled
    tokens of the old, silently; prefill refuses until ``prepare`` is called again."""
    from lordba.quant import set_compute

    lm = tiny_q4(adapter=True)
    want = eager(lm)[0]
    adapters = list(lm.adapter_modules("default").values())
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    n = PROMPT.shape[1] + NEW
    assert decode.prepare(n)
    for a in adapters:
        a.scaling = a.scaling * 2
    with pytest.raises(ConfigError, match="prepare"):
        decode.prefill(PROMPT)
    for a in adapters:
        a.scaling = a.scaling / 2
    set_compute(lm, "fast")
    with pytest.raises(ConfigError, match="prepare"):
        decode.prefill(PROMPT)
    set_compute(lm, "exact")
    assert decode.prepare(n) and decode.position == 0  # the same graph: exported again, its package reused
    assert torch.equal(decode.generate(PROMPT, NEW, eos_token_id=[]), want)
    assert len(list(tmp_path.glob("step-*.pt2"))) == 1


def test_a_token_id_outside_the_vocabulary_is_refused_naming_it(tmp_path):
    """``step`` with a token id the model has no embedding for raised the compiled step's own bounds check (a
    RuntimeError with a C++ stack trace); the decoder's error names the token and the ids, and keeps the position."""
    lm = tiny_q4(adapter=False)
    decode = AotDecode(lm, folder=tmp_path, round_to=16)
    assert decode.prepare(12)
    decode.prefill(PROMPT)
    vocab = lm.config.vocab_size
    for token in (vocab, -1):
        with pytest.raises(ConfigError, match=f"token {token} is not a token id of the model \\(0 to {vocab - 1}\\)"):
            decode.step(token)
    assert decode.position == PROMPT.shape[1]
    assert decode.step(vocab - 1).shape == (vocab,)


def test_a_token_id_outside_the_vocabulary_is_refused_when_the_embeddings_are_trained_per_adapter(tmp_path):
    """With ``modules_to_save=["embed_tokens"]`` the input embeddings are a ``SavedModule`` (no ``num_embeddings``):
    the decoder knew no vocabulary and let an id past the embeddings into the compiled step (a RuntimeError with a
    C++ stack trace); it now reads the rows of the wrapped embedding and refuses the id naming it."""
    from lordba import LoRDBAConfig, get_lordba_model

    torch.manual_seed(3)
    lm = get_lordba_model(tiny_q4(adapter=False), LoRDBAConfig(r=4, init="random", modules_to_save=["embed_tokens"]))
    lm.pack()
    vocab = lm.config.vocab_size
    decode = AotDecode(lm.eval(), folder=tmp_path, round_to=16)
    assert decode.vocab == vocab and decode.prepare(12)
    decode.prefill(PROMPT)
    with pytest.raises(ConfigError, match=f"token {vocab} is not a token id of the model \\(0 to {vocab - 1}\\)"):
        decode.step(vocab)
    assert decode.position == PROMPT.shape[1]


@pytest.mark.long
def test_small_adapter_tensors_are_read_live_never_compiled_into_the_package(tmp_path):
    """Inductor inlines a constant of one dimension and at most 8 values into the code it generates: an adapter's
    ``scale_mid`` (its rank: 4 here, 8 often) was compiled into the package, so an in-place edit was ignored and a
    second model of the same shapes (same package name) decoded with the first model's values, silently. Every
    tensor is now read live: the step follows both."""

    def teacher_forced(decode, ids):
        decode.prepare(PROMPT.shape[1] + NEW)
        logits = [decode.prefill(PROMPT)]
        for token in ids[0, PROMPT.shape[1] : -1].tolist():
            logits.append(decode.step(token))
        return torch.stack(logits)

    lm = tiny_q4(adapter=True)
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    assert decode.prepare(PROMPT.shape[1] + NEW)
    for a in lm.adapter_modules("default").values():
        assert a.scale_mid.numel() <= 8
        with torch.no_grad():
            a.scale_mid.mul_(1.5)  # in place: the same step, reading it live
    want_ids, want_logits = eager(lm)
    torch.testing.assert_close(teacher_forced(decode, want_ids), want_logits, rtol=1e-4, atol=1e-4)
    other = tiny_q4(adapter=True)
    for a in other.adapter_modules("default").values():
        with torch.no_grad():
            a.scale_mid.mul_(-0.5)
    want_ids, want_logits = eager(other)
    second = AotDecode(other, folder=tmp_path, kv_dtype="float32")
    torch.testing.assert_close(teacher_forced(second, want_ids), want_logits, rtol=1e-4, atol=1e-4)
    assert second.compile_seconds == 0 and len(list(tmp_path.glob("step-*.pt2"))) == 1  # the first one's package


@pytest.mark.long
def test_a_change_between_prefill_and_step_is_refused_by_step_not_decoded_with_the_old_step(tmp_path):
    """prefill refused a change since :meth:`AotDecode.prepare`; a change after the prefill (a new scaling, a
    ``disable_adapter`` block, the q4 ``compute``) went on through the compiled step of the old state, silently:
    a prompt of one state continued by tokens of another. step refuses it too, naming what to do."""
    from lordba.nn.epoch import touch
    from lordba.quant import set_compute

    lm = tiny_q4(adapter=True)
    adapters = list(lm.adapter_modules("default").values())
    decode = AotDecode(lm, folder=tmp_path, kv_dtype="float32")
    n = PROMPT.shape[1] + NEW
    assert decode.prepare(n)
    decode.prefill(PROMPT)
    decode.step(7)  # unchanged: decodes
    touch()  # another model's adapter changed (the epoch is the process's): this one's step goes on
    decode.step(7)
    for a in adapters:
        a.scaling = a.scaling * 2
    with pytest.raises(ConfigError, match="prepare"):
        decode.step(7)
    for a in adapters:
        a.scaling = a.scaling / 2
    assert decode.prepare(n)
    decode.prefill(PROMPT)
    with lm.disable_adapter():
        with pytest.raises(ConfigError, match="prepare"):
            decode.step(7)
    set_compute(lm, "fast")
    with pytest.raises(ConfigError, match="prepare"):
        decode.step(7)
    set_compute(lm, "exact")
    assert decode.position == PROMPT.shape[1]  # nothing refused was decoded
    assert decode.step(7).shape[-1] == lm.config.vocab_size  # the prepared state again: decodes


def test_the_package_key_holds_the_thread_count():
    """Inductor writes the compile's thread count into the package's parallel loops: a package built under
    ``--threads 16`` was loaded by a run at 2 threads (oversubscribed) and one built at 1 ran single-threaded."""
    from types import SimpleNamespace

    from lordba.nn.aot_package import package_key

    program = SimpleNamespace(graph_module=SimpleNamespace(code="def forward(x): return x"))
    tensors = {"w": torch.zeros(2, 3)}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = package_key(program, tensors, {})
        assert package_key(program, tensors, {}) == one
        torch.set_num_threads(2)
        assert package_key(program, tensors, {}) != one
    finally:
        torch.set_num_threads(before)


_KILLED_COMPILE = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
import torch
from lordba.kernels.cpu import aoti
from lordba.nn.aot_package import compiled_package

def compile_forever(program, package_path, **kwargs):
    Path(package_path).write_bytes(b"half a package")
    print("half written", flush=True)
    time.sleep(600)

aoti.c_shims = lambda: {}
torch._inductor.aoti_compile_and_package = compile_forever
program = SimpleNamespace(graph_module=SimpleNamespace(code="def forward(x): return x"))
compiled_package(program, {"w": torch.zeros(2)}, Path(sys.argv[1]), lambda line: None)
"""


def test_a_killed_compiles_temporary_package_is_removed_by_the_next_compile(tmp_path, monkeypatch):
    """A compile killed by SIGKILL (or the out-of-memory killer) left its temporary ``.step-*.pt2`` file in the
    package cache for good, one per killed run; the next call removes it (its process is gone), never a live
    compile's."""
    import os
    import signal
    import subprocess
    import sys
    import zipfile
    from types import SimpleNamespace

    from lordba.format.atomic import TMP_MARK
    from lordba.kernels.cpu import aoti
    from lordba.nn.aot_package import compiled_package

    child = subprocess.Popen([sys.executable, "-c", _KILLED_COMPILE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "half written\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    left = [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
    assert len(left) == 1 and left[0].read_bytes() == b"half a package"
    live = tmp_path / f".step-other.pt2{TMP_MARK}{os.getpid()}.0123abcd.pt2"  # this process's: still compiling
    live.write_bytes(b"")

    def compile_now(program, package_path, **kwargs):
        with zipfile.ZipFile(package_path, "w") as archive:
            archive.writestr("data", b"a package")

    monkeypatch.setattr(aoti, "c_shims", lambda: {})
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_now)
    program = SimpleNamespace(graph_module=SimpleNamespace(code="def forward(x): return x"))
    path, _ = compiled_package(program, {"w": torch.zeros(2)}, tmp_path, print)
    assert sorted(tmp_path.iterdir()) == sorted([path, live])
