import inspect
import itertools
import re
import sys
import threading
import warnings

import pytest
import torch

from lordba import AdapterStateError, ConfigError, LoRDBAConfig, LoRDBAModel, TargetModulesError, get_lordba_model
from lordba.nn.adapter import PackedAdapter, TrainableAdapter
from lordba.nn.layer import LoRDBALinear

from conftest import tiny_llama


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def randomized(config_kwargs=None, seed=0, adapter_seed=5):
    model = tiny_llama(seed)
    torch.manual_seed(adapter_seed)
    return get_lordba_model(model, LoRDBAConfig(r=4, init="random", **(config_kwargs or {})))


def test_cold_adapter_is_a_no_op_and_only_it_trains(tiny_model, input_ids):
    ref = logits(tiny_model, input_ids)
    lm = get_lordba_model(tiny_model, LoRDBAConfig(r=4))
    assert torch.equal(logits(lm, input_ids), ref)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lordba_adapters.default." in n for n in trainable)
    assert len(trainable) == 5 * 14  # 2 layers × 7 targets × (2 latents + 3 scales)
    out = lm(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert all(p.grad is None for n, p in lm.named_parameters() if not p.requires_grad)
    # cold start: a = 0, so only a receives gradient in the first step
    ad = lm.adapter_modules("default")["model.layers.0.self_attn.q_proj"]
    assert ad.scale_out.grad.abs().sum() > 0
    assert ad.latent_A.grad.abs().sum() == 0


def test_forward_signature_is_the_base_models(tiny_model):
    lm = get_lordba_model(tiny_model, LoRDBAConfig(r=2))
    params = inspect.signature(lm.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16", "int8"])
def test_save_load_round_trip_is_bit_exact(tmp_path, input_ids, scale_dtype):
    lm = randomized({"scale_dtype": scale_dtype})
    before = logits(lm, input_ids)
    lm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "lordba_model.safetensors",
    ]
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)
    assert torch.equal(logits(loaded, input_ids), before)
    for path, ad in lm.adapter_modules("default").items():
        other = loaded.adapter_modules("default")[path]
        for k, v in ad.stored_tensors().items():
            assert torch.equal(v, other.stored_tensors()[k]), (path, k)
    # saving again gives byte-identical files (deterministic); PEFT's safe_serialization=True is taken
    loaded.save_pretrained(tmp_path / "again", safe_serialization=True)
    for name in ("lordba_model.safetensors", "adapter_config.json"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    with pytest.raises(ConfigError, match="safetensors only"):
        loaded.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert not (tmp_path / "pickle").exists()


def test_one_adapter_name_given_as_a_string_is_saved(tmp_path, input_ids):
    # selected_adapters="chat" was taken as the list of its characters: AdapterStateError "unknown adapter 'c'"
    # (set_adapter, merge and delete take one name as a string)
    lm = randomized()
    torch.manual_seed(7)
    lm.add_adapter("chat", LoRDBAConfig(r=2, target_modules=["k_proj"], init="random"))
    lm.save_pretrained(tmp_path, selected_adapters="chat")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat"]
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "chat")
    lm.set_adapter("chat")
    assert torch.equal(logits(loaded, input_ids), logits(lm, input_ids))


def test_packing_in_memory_keeps_logits(input_ids):
    lm = randomized()
    before = logits(lm, input_ids)
    lm.pack()
    adapters = list(lm.adapter_modules("default").values())
    assert all(isinstance(ad, PackedAdapter) for ad in adapters)
    assert torch.equal(logits(lm, input_ids), before)
    # held as a loaded file's tensors are: views of one buffer (decode reads them faster), not overlapping
    names = ("sign_A", "sign_B", "scale_in", "scale_mid", "scale_out")
    tensors = [getattr(ad, n) for ad in adapters for n in names]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert all(t.is_contiguous() for t in tensors)


def test_named_adapters_go_to_subfolders_and_stack(tmp_path, input_ids):
    lm = randomized()
    torch.manual_seed(7)
    lm.add_adapter("second", LoRDBAConfig(r=2, init="random", target_modules=["q_proj", "v_proj"]))
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "lordba_model.safetensors").is_file()
    assert (tmp_path / "second" / "lordba_model.safetensors").is_file()
    base = tiny_llama(0)
    ref_base = logits(base, input_ids)
    one = logits(lm, input_ids)
    lm.set_adapter("second")
    two = logits(lm, input_ids)
    lm.set_adapter(["default", "second"])
    both = logits(lm, input_ids)
    assert not torch.allclose(one, two)
    # stacked: different from either alone; deleting one returns the other's outputs
    assert not torch.allclose(both, one) and not torch.allclose(both, two)
    lm.delete_adapter("second")
    assert lm.active_adapters == ["default"]
    assert torch.equal(logits(lm, input_ids), one)
    lm.delete_adapter("default")
    assert not any(isinstance(m, LoRDBALinear) for m in lm.base_model.modules())
    assert torch.equal(logits(lm, input_ids), ref_base)


def test_a_save_of_several_adapters_that_one_cannot_take_writes_none(tmp_path):
    # The adapters were written one by one: "default" was replaced by the new save before "chat" (int4
    # scales, which format version 1 cannot hold) was refused, leaving a folder of half old, half new adapters.
    from lordba import AdapterFormatError

    lm = randomized()
    torch.manual_seed(7)
    lm.add_adapter("chat", LoRDBAConfig(r=2, init="random", target_modules=["q_proj"], scale_dtype="int4"))
    lm.save_pretrained(tmp_path)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    with torch.no_grad():
        next(iter(lm.adapter_modules("default").values())).scale_mid.mul_(2)
    with pytest.raises(AdapterFormatError, match=r"'chat'.*int4"):
        lm.save_pretrained(tmp_path, format_version=1)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def test_a_save_of_several_adapters_whose_later_folder_cannot_be_made_writes_none(tmp_path):
    """Every adapter's folder is made and checked before any adapter is written. Was: "default" was written into the
    save directory, then the folder of "chat" could not be created (a file of that name there): LoRDBAError, and the
    directory held a new "default" beside no "chat" (a half-done save)."""
    from lordba import LoRDBAError

    lm = randomized()
    lm.add_adapter("code", LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    lm.add_adapter("chat", LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "chat").write_text("a file, not a folder")
    with pytest.raises(LoRDBAError, match="chat: cannot create the directory"):
        lm.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["chat"]  # (the folder made for "code" removed)


@pytest.mark.parametrize("where", ["directory", "adapter"])
@pytest.mark.parametrize("bad", ["a\x00b", "x" * 300])
def test_a_save_path_the_file_system_refuses_is_a_lordba_error(tmp_path, where, bad):
    """A NUL character or a name over the file system's 255 bytes, in the save directory or in an adapter's name
    (its folder): LoRDBAError naming the path, nothing written. Was: ValueError 'embedded null byte' (the cleanup of
    the folders made, masking the LoRDBAError) and OSError 'File name too long' (the check for an existing folder)."""
    from lordba import LoRDBAError

    lm = randomized()
    if where == "adapter" and "\x00" in bad:  # no new adapter takes it (not a Windows folder name); a loaded one may
        with pytest.raises(LoRDBAError, match="cannot be a folder name on Windows"):
            lm.add_adapter(bad, LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
        lm.save_pretrained(tmp_path / "saved")
        lm.load_adapter(tmp_path / "saved", bad)
    elif where == "adapter":
        lm.add_adapter(bad, LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    (tmp_path / "out").mkdir()
    with pytest.raises(LoRDBAError, match=r"not a usable path|cannot create the directory|would be saved in a folder"):
        lm.save_pretrained(tmp_path / "out" / bad if where == "directory" else tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_a_linear_registered_under_two_names_is_adapted_on_both(input_ids):
    """A module registered twice (``self.alias = self.proj``) is wrapped once and the wrapper put in both slots, so a
    call through either name runs the adapter; deleting the adapter, unloading or merging puts the base back in both.
    Was: only the first path was wrapped; calls through the other bypassed the adapter, silently."""
    from torch import nn

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.alias = self.proj

        def forward(self, x):
            return self.proj(x) + self.alias(x)

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    model = Twice()
    lm = get_lordba_model(model, LoRDBAConfig(r=2, init="random", target_modules=["proj"]))
    assert model.alias is model.proj and isinstance(model.proj, LoRDBALinear)
    with torch.no_grad():
        assert torch.equal(lm(x), 2 * model.proj(x))
        want = model.proj(x)
    base = model.proj.base_layer
    lm.add_adapter("other", LoRDBAConfig(r=2, init="random", target_modules=["proj"]))
    lm.delete_adapter("other")
    assert model.alias is model.proj
    unloaded = lm.merge_and_unload()
    assert unloaded.alias is unloaded.proj is base
    with torch.no_grad():
        assert torch.allclose(unloaded.alias(x), want, atol=1e-5)


def test_mixed_batch_matches_per_adapter_runs(tmp_path, input_ids):
    lm = randomized()
    lm.save_pretrained(tmp_path / "a")
    other = randomized(adapter_seed=9)
    other.save_pretrained(tmp_path / "b")
    lm.load_adapter(tmp_path / "b", "b")
    names = ["b", "__base__", "default"]
    mixed = logits(lm, input_ids, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with lm.disable_adapter():
                want = logits(lm, input_ids[i : i + 1])
        else:
            lm.set_adapter(name)
            want = logits(lm, input_ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        logits(lm, input_ids, adapter_names=["default", "nope", "b"])


def test_generate_through_the_wrapper_with_mixed_adapters(tmp_path, input_ids):
    lm = randomized()
    other = randomized(adapter_seed=9)
    other.save_pretrained(tmp_path)
    lm.load_adapter(tmp_path, "b")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = lm.generate(input_ids[:2], adapter_names=["default", "b"], **kw)
    lm.set_adapter("default")
    first = lm.generate(input_ids[:1], **kw)
    lm.set_adapter("b")
    second = lm.generate(input_ids[1:2], **kw)
    assert torch.equal(mixed[0], first[0]) and torch.equal(mixed[1], second[0])
    beams = lm.generate(input_ids[:2], adapter_names=["default", "b"], num_beams=2, **kw)
    assert beams.shape == mixed.shape


def test_generate_with_mixed_adapters_follows_a_positional_generation_config(tmp_path, input_ids):
    """``generate(ids, generation_config, adapter_names=...)`` (transformers' second positional parameter):
    its beams and returned sequences multiply the rows as a keyword ``generation_config`` does; the names
    were expanded by the model's own config instead, and the call failed (2 names for 4 rows)."""
    from transformers import GenerationConfig

    lm = randomized()
    randomized(adapter_seed=9).save_pretrained(tmp_path)
    lm.load_adapter(tmp_path, "b")
    names = ["default", "b"]
    for config in (
        GenerationConfig(max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0),
        GenerationConfig(max_new_tokens=3, num_return_sequences=2, do_sample=True, top_k=1, pad_token_id=0),
    ):
        want = lm.generate(input_ids[:2], generation_config=config, adapter_names=names)
        got = lm.generate(input_ids[:2], config, adapter_names=names)
        assert torch.equal(got, want)


def test_generate_with_mixed_adapters_and_beams_on_an_encoder_decoder_model():
    """T5 / BART run the encoder once per input and the decoder once per beam (or returned sequence): the names,
    repeated per beam, reached the encoder too, and ``generate(ids, adapter_names=[...], num_beams=3)`` raised
    ShapeMismatchError ("adapter_names has 6 entries for a batch of 2 rows"). PEFT routes the encoder by the names
    as given; so does lordba, and each row's beams are those of its adapter alone."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_ff=24, d_kv=8, num_layers=1, num_heads=2, decoder_start_token_id=0)
    lm = get_lordba_model(T5ForConditionalGeneration(config).eval(), LoRDBAConfig(r=2, init="random"))
    lm.add_adapter(
        "b", LoRDBAConfig(r=2, init="random", target_modules=["q", "v", "wi"], modules_to_save=["final_layer_norm"])
    )
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.normal_(0, 1) if "scale_out" in name or "lordba_saved" in name else None
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=3)
    mixed = lm.generate(ids, adapter_names=["default", "b"], **kw)
    for row, name in enumerate(["default", "b"]):
        lm.set_adapter(name)
        assert torch.equal(mixed[row], lm.generate(ids[row : row + 1], **kw)[0])
    sampled = lm.generate(ids, adapter_names=["b", "default"], do_sample=True, num_return_sequences=2, max_new_tokens=2)
    assert sampled.shape[0] == 4


def test_generate_with_mixed_adapters_repeats_the_names_for_an_encoder_decoders_decoder_only(input_ids):
    """An encoder-decoder model's encoder runs on the rows before ``generate`` repeats them for beams or returned
    sequences: with the names repeated for every layer it raised ShapeMismatchError ("adapter_names has 4 entries
    for a batch of 2 rows"). Its layers (and modules trained in full) take the names as given (PEFT's routing)."""
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=101, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2, decoder_start_token_id=0)
    lm = get_lordba_model(T5ForConditionalGeneration(config).eval(), LoRDBAConfig(r=2, target_modules=["q", "v"]), "a")
    lm.add_adapter("b", LoRDBAConfig(r=2, target_modules=["q", "v"], modules_to_save=["encoder.final_layer_norm"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name in ("a", "b"):
            for ad in lm.adapter_modules(name).values():
                ad.scale_out.normal_(0.0, 0.5)
        lm.base_model.encoder.final_layer_norm.lordba_saved["b"].weight.normal_()
    lm.eval()
    ids = input_ids[:2, :6].clamp(min=2)
    names = ["a", "b"]
    for gen in (
        GenerationConfig(max_new_tokens=4, num_beams=2, do_sample=False, decoder_start_token_id=0),
        GenerationConfig(max_new_tokens=4, num_return_sequences=2, do_sample=True, top_k=1, decoder_start_token_id=0),
    ):
        mixed = lm.generate(input_ids=ids, generation_config=gen, adapter_names=names)
        for i, name in enumerate(names):
            lm.set_adapter(name)
            alone = lm.generate(input_ids=ids[i : i + 1], generation_config=gen)
            rows = mixed.shape[0] // len(names)
            assert torch.equal(mixed[i * rows : (i + 1) * rows, : alone.shape[1]], alone), (gen, name)


def test_disable_adapter_context(input_ids):
    lm = randomized()
    base = logits(tiny_llama(0), input_ids)
    with lm.disable_adapter():
        assert torch.equal(logits(lm, input_ids), base)
    assert not torch.equal(logits(lm, input_ids), base)


def test_disable_adapter_decorates_a_function_and_is_entered_and_exited_by_hand_as_peft_s(input_ids):
    """PEFT's ``disable_adapter()`` is a contextlib context manager: it also decorates a function (each call in a
    block) and has ``__enter__`` / ``__exit__``; an exception of the block comes out unchanged, the block ended."""
    lm = randomized()
    base, adapted = logits(tiny_llama(0), input_ids), logits(lm, input_ids)

    @lm.disable_adapter()
    def run():
        return logits(lm, input_ids)

    for _ in range(2):
        assert torch.equal(run(), base)
        assert torch.equal(logits(lm, input_ids), adapted)
    block = lm.disable_adapter()
    block.__enter__()
    assert torch.equal(logits(lm, input_ids), base)
    assert block.__exit__(None, None, None) is False
    assert torch.equal(logits(lm, input_ids), adapted)
    error = ValueError("in the block")
    assert sys.exc_info()[1] is None  # (the traced Ctrl-C tests before it in a process left a StopIteration there)
    with pytest.raises(ValueError) as raised, lm.disable_adapter():
        raise error
    assert raised.value is error and raised.value.__context__ is None
    assert torch.equal(logits(lm, input_ids), adapted)
    lm.set_adapter("default")  # (the block's lock and gate given back)


def test_a_disable_adapter_block_disables_its_own_model_only(input_ids):
    """Within ``a.disable_adapter()``, another LoRDBA model ``b`` (a reward or reference model beside the policy, a
    copy) ran without its adapters too: the block's state was one flag for every model of the thread. PEFT's block
    disables its own model's layers only; so does lordba's, and ``b`` can have its own block inside ``a``'s."""
    a, b = randomized(adapter_seed=5), randomized(adapter_seed=6)
    base = logits(tiny_llama(0), input_ids)
    want_b = logits(b, input_ids)
    with a.disable_adapter():
        torch.testing.assert_close(logits(a, input_ids), base, rtol=0, atol=0)
        torch.testing.assert_close(logits(b, input_ids), want_b, rtol=0, atol=0)
        with b.disable_adapter():
            torch.testing.assert_close(logits(b, input_ids), base, rtol=0, atol=0)
        torch.testing.assert_close(logits(b, input_ids), want_b, rtol=0, atol=0)
        torch.testing.assert_close(logits(a, input_ids), base, rtol=0, atol=0)
        b.merge_adapter()  # b is not disabled: it merges
        b.unmerge_adapter()
    assert not torch.equal(logits(a, input_ids), base)


def test_merge_and_unload_and_unload(input_ids):
    lm = randomized()
    unmerged = logits(lm, input_ids)
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), unmerged, rtol=1e-4, atol=1e-4)
    lm.unmerge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), unmerged, rtol=1e-5, atol=1e-5)
    merged = randomized().merge_and_unload()
    assert not any(isinstance(m, LoRDBALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), unmerged, rtol=1e-4, atol=1e-4)
    plain = randomized().unload()
    torch.testing.assert_close(logits(plain, input_ids), logits(tiny_llama(0), input_ids), rtol=0, atol=1e-6)


def test_hotswap_replaces_weights_in_place(tmp_path, input_ids):
    randomized(adapter_seed=11).save_pretrained(tmp_path / "new")
    lm = randomized()
    lm.pack()
    ptrs = {p: (a.sign_A.data_ptr(), a.scale_out.data_ptr()) for p, a in lm.adapter_modules("default").items()}
    lm.hotswap_adapter(tmp_path / "new", "default")
    assert ptrs == {p: (a.sign_A.data_ptr(), a.scale_out.data_ptr()) for p, a in lm.adapter_modules("default").items()}
    fresh = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "new")
    assert torch.equal(logits(lm, input_ids), logits(fresh, input_ids))


def test_hotswap_subset_zeroes_the_rest_and_rank_mismatch_is_refused(tmp_path, input_ids):
    torch.manual_seed(3)
    sub = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", target_modules=["q_proj"]))
    sub.save_pretrained(tmp_path / "sub")
    lm = randomized()
    lm.hotswap_adapter(tmp_path / "sub", "default")
    assert torch.equal(
        logits(lm, input_ids), logits(LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "sub"), input_ids)
    )
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random")).save_pretrained(tmp_path / "r2")
    before = logits(lm, input_ids)
    with pytest.raises(AdapterStateError, match="rank"):
        lm.hotswap_adapter(tmp_path / "r2", "default")
    assert torch.equal(logits(lm, input_ids), before)


def test_hotswap_takes_the_new_adapters_dropout(tmp_path, input_ids):
    # The swapped-in config (peft_config, and the next save) has the file's dropout: the adapters trained
    # with the old one (a file with dropout 0.25 swapped into one without trained with none).
    randomized().save_pretrained(tmp_path / "a")
    randomized({"dropout": 0.25}, adapter_seed=9).save_pretrained(tmp_path / "b")
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a", is_trainable=True)
    lm.hotswap_adapter(tmp_path / "b")
    assert lm.peft_config["default"].dropout == 0.25
    assert {a.dropout for a in lm.adapter_modules("default").values()} == {0.25}
    fresh = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "b", is_trainable=True)
    lm.train()
    fresh.train()
    torch.manual_seed(0)
    swapped = lm(input_ids=input_ids).logits
    torch.manual_seed(0)
    assert torch.equal(swapped, fresh(input_ids=input_ids).logits)
    lm.hotswap_adapter(tmp_path / "a")
    assert {a.dropout for a in lm.adapter_modules("default").values()} == {0.0}


@pytest.mark.parametrize("quantized", [False, True])
def test_hotswap_of_a_merged_adapter_is_refused_and_changes_nothing(tmp_path, input_ids, quantized):
    # The merged base holds the old ΔW: a swap would leave the outputs the old adapter's, and the unmerge
    # would subtract the new ΔW from an in-place merged weight (a corrupt base).
    from lordba.quant import quantize_model

    def build(seed):
        base = tiny_llama(0)
        base = quantize_model(base, backend="q4", group_size=64) if quantized else base
        torch.manual_seed(seed)
        lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"))
        lm.pack()  # the form a loaded adapter has: the swapped model computes as a fresh load
        return lm

    build(11).save_pretrained(tmp_path / "new")
    lm = build(5)
    with lm.disable_adapter():
        base = logits(lm, input_ids)
    lm.merge_adapter()
    merged = logits(lm, input_ids)
    with pytest.raises(AdapterStateError, match="merged"):
        lm.hotswap_adapter(tmp_path / "new", "default")
    assert torch.equal(logits(lm, input_ids), merged)
    lm.unmerge_adapter()
    with lm.disable_adapter():
        torch.testing.assert_close(logits(lm, input_ids), base, rtol=0, atol=1e-5)
    lm.hotswap_adapter(tmp_path / "new", "default")  # unmerged: the swap goes through
    fresh = LoRDBAModel.from_pretrained(build(0).unload(), tmp_path / "new")
    torch.testing.assert_close(logits(lm, input_ids), logits(fresh, input_ids), rtol=0, atol=1e-5)


def test_from_pretrained_trainable_scales(tmp_path, input_ids):
    randomized().save_pretrained(tmp_path)
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)
    names = {n.rsplit(".", 1)[-1] for n, p in lm.named_parameters() if p.requires_grad}
    assert names == {"scale_in", "scale_mid", "scale_out"}
    frozen = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    lm.unpack_to_latent("default")
    lm.set_trainable("default", signs=True, scales=True)
    assert any(n.endswith("latent_A") for n, p in lm.named_parameters() if p.requires_grad)


def test_print_trainable_parameters_and_size_report(capsys, tiny_model):
    lm = get_lordba_model(tiny_model, LoRDBAConfig(r=4, scale_dtype="int8"))
    lm.print_trainable_parameters()
    assert "trainable params:" in capsys.readouterr().out
    rep = lm.size_report()
    assert len(rep.modules) == 14 and rep.scale_dtype == "int8"
    assert rep.fp16_lora_payload_bytes == sum(2 * 4 * (m.in_features + m.out_features) for m in rep.modules)


def test_bad_targets_and_names(tiny_model):
    with pytest.raises(TargetModulesError, match="matched no module"):
        get_lordba_model(tiny_llama(0), LoRDBAConfig(target_modules=["nope_proj"]))
    with pytest.raises(TargetModulesError, match="not a supported linear"):
        get_lordba_model(tiny_llama(0), LoRDBAConfig(target_modules=["mlp"]))
    lm = get_lordba_model(tiny_model, LoRDBAConfig(r=2))
    with pytest.raises(TargetModulesError, match="already has LoRDBA layers"):
        get_lordba_model(tiny_model, LoRDBAConfig(r=2))
    for bad in ("", "a.b", "__base__", "default"):
        with pytest.raises((ConfigError, AdapterStateError)):
            lm.add_adapter(bad, LoRDBAConfig(r=2))
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        lm.set_adapter("missing")
    with pytest.raises(ConfigError):
        lm.add_adapter("x", {"r": 2})


def test_an_adapter_name_that_is_a_module_attribute_is_refused_naming_it(tmp_path, input_ids):
    """A layer holds its adapters in an nn.ModuleDict, which refuses its attributes as keys: add_adapter("train"),
    get_lordba_model(..., adapter_name="half"), load_adapter(dir, "to") or add_weighted_adapter(..., "forward") raised a
    bare KeyError ("attribute 'train' already exists") from inside torch."""
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path)
    with torch.no_grad():
        before = lm(input_ids=input_ids).logits
    for name in ("train", "half", "to", "forward", "training", "state_dict"):
        with pytest.raises(ConfigError, match=f"adapter name '{name}' is an attribute"):
            lm.add_adapter(name, LoRDBAConfig(r=2, target_modules=["q_proj"]))
        with pytest.raises(ConfigError, match=f"adapter name '{name}'"):
            lm.load_adapter(tmp_path, name)
    with pytest.raises(ConfigError, match="adapter name 'half'"):
        get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2), adapter_name="half")
    assert list(lm.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(lm(input_ids=input_ids).logits, before)
    lm.add_adapter("weight", LoRDBAConfig(r=2, target_modules=["q_proj"]))  # a name no ModuleDict has: accepted


def test_an_adapter_name_windows_cannot_hold_as_a_folder_is_refused_naming_it(tmp_path):
    """save_pretrained writes every adapter but "default" into a folder of its name. add_adapter("con"), ("aux"),
    ("COM1"), ("a:b") and the like were accepted and saved on Linux into folders that are devices on Windows (or, with
    ':', an alternate data stream of another file): the saved model could not be copied to Windows or loaded there.
    Such names are refused for an adapter made here, on every platform. An adapter loaded from files may keep such a
    name (a Linux server's adapter folder ``aux``), but is not saved under it."""
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path / "saved")
    for name in ("CON", "aux", "Nul", "prn", "COM1", "lpt9", "COM\u00b9", "a:b", "a|b", "x?", "tab\t", "trail "):
        with pytest.raises(
            ConfigError, match=f"adapter name {re.escape(repr(name))} cannot be a folder name on Windows"
        ):
            lm.add_adapter(name, LoRDBAConfig(r=2, target_modules=["q_proj"]))
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "saved", adapter_name="aux")
    loaded.load_adapter(tmp_path / "saved", "a:b")
    assert sorted(loaded.peft_config) == ["a:b", "aux"]
    for name in ("aux", "a:b"):
        with pytest.raises(ConfigError, match=f"save_pretrained: adapter {re.escape(repr(name))} would be saved in"):
            loaded.save_pretrained(tmp_path / "again", selected_adapters=[name])
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())
    with pytest.raises(ConfigError, match="adapter name 'aux' cannot be a folder name on Windows"):
        get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2), adapter_name="aux")
    assert list(lm.peft_config) == ["default"]
    for name in ("com10", "console", "aux_2", "nul-adapter"):  # not device names: accepted, saved in their folders
        lm.add_adapter(name, LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir()) == [
        "aux_2",
        "com10",
        "console",
        "nul-adapter",
    ]


def test_foreign_lora_wrapper_is_refused():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TargetModulesError, match="already wrapped"):
        get_lordba_model(peft_model.base_model.model, LoRDBAConfig(r=2, target_modules=["q_proj"]))


def test_concurrent_forwards_switches_and_hotswaps_never_mix_adapters(tmp_path, input_ids):
    """Readers run mixed batches while another thread switches adapters and hot-swaps 'default'
    between two different files: every output must be exactly one of the known results."""
    lm = randomized()
    lm.save_pretrained(tmp_path / "a")
    randomized(adapter_seed=9).save_pretrained(tmp_path / "b")
    randomized(adapter_seed=13).save_pretrained(tmp_path / "c")
    lm.load_adapter(tmp_path / "b", "b")
    lm.pack()
    allowed = {"b": [logits(lm, input_ids, adapter_names=["b"] * 3)]}
    allowed["default"] = [logits(lm, input_ids, adapter_names=["default"] * 3)]
    lm.hotswap_adapter(tmp_path / "c", "default")
    allowed["default"].append(logits(lm, input_ids, adapter_names=["default"] * 3))
    assert not torch.equal(*allowed["default"])
    errors = []

    def reader(name):
        for _ in range(20):
            got = logits(lm, input_ids, adapter_names=[name] * 3)
            if not any(torch.equal(got, want) for want in allowed[name]):
                errors.append(name)

    def switcher():
        for i in range(20):
            lm.set_adapter("b" if i % 2 else "default")
            lm.hotswap_adapter(tmp_path / ("a" if i % 2 else "c"), "default")

    threads = [threading.Thread(target=reader, args=(n,)) for n in ("default", "b", "default")]
    threads.append(threading.Thread(target=switcher))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_loading_for_inference_is_compact_and_for_training_is_not(tmp_path, tiny_model, input_ids):
    import copy

    from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model

    cfg = LoRDBAConfig(r=4, target_modules=["q_proj", "v_proj"], init="random", scale_dtype="int8")
    lm = get_lordba_model(copy.deepcopy(tiny_model), cfg)
    lm.pack()
    lm.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = lm(input_ids=input_ids).logits
    served = LoRDBAModel.from_pretrained(copy.deepcopy(tiny_model), tmp_path)
    assert all(isinstance(a, PackedAdapter) for a in served.adapter_modules("default").values())
    trainable = LoRDBAModel.from_pretrained(copy.deepcopy(tiny_model), tmp_path, is_trainable=True)
    assert all(isinstance(a, TrainableAdapter) for a in trainable.adapter_modules("default").values())
    with torch.no_grad():
        assert torch.equal(served(input_ids=input_ids).logits, expected)
        assert torch.equal(trainable(input_ids=input_ids).logits, expected)
    served.save_pretrained(tmp_path / "again")  # a compact adapter saves the same bytes
    assert (tmp_path / "again" / "lordba_model.safetensors").read_bytes() == (
        tmp_path / "lordba_model.safetensors"
    ).read_bytes()


def _saved_adapter(tmp_path, tiny_model, name, targets, scale_dtype, seed):
    import copy

    from lordba import LoRDBAConfig, get_lordba_model

    torch.manual_seed(seed)
    cfg = LoRDBAConfig(r=4, target_modules=targets, init="random", scale_dtype=scale_dtype)
    lm = get_lordba_model(copy.deepcopy(tiny_model), cfg)
    lm.pack()
    lm.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("kernel", ["auto", "dense"])
def test_compact_hotswap_to_a_subset_in_another_format_equals_loading_it(tmp_path, tiny_model, input_ids, kernel):
    import copy

    from lordba import LoRDBAModel, kernels

    first = _saved_adapter(tmp_path, tiny_model, "a", ["q_proj", "v_proj"], "int8", 1)
    subset = _saved_adapter(tmp_path, tiny_model, "b", ["q_proj"], "float16", 2)
    served = LoRDBAModel.from_pretrained(copy.deepcopy(tiny_model), first)
    fresh = LoRDBAModel.from_pretrained(copy.deepcopy(tiny_model), subset)
    with torch.no_grad(), kernels.mode(kernel):
        served(input_ids=input_ids)  # caches built for the first adapter
        served.hotswap_adapter(subset)
        assert torch.equal(served(input_ids=input_ids).logits, fresh(input_ids=input_ids).logits)
    for adapter in served.adapter_modules("default").values():  # v_proj silenced in the new format
        assert adapter.scale_in.dtype == torch.float16
    served.save_pretrained(tmp_path / "again")  # the swapped-in adapter, as its own file
    name = "lordba_model.safetensors"
    assert (tmp_path / "again" / name).read_bytes() == (subset / name).read_bytes()


def test_compact_scales_keep_their_dtypes_through_half_and_refuse_a_foreign_state(tmp_path, tiny_model):
    import copy

    from lordba import LoRDBAModel

    saved = _saved_adapter(tmp_path, tiny_model, "a", ["q_proj"], "int8", 3)
    served = LoRDBAModel.from_pretrained(copy.deepcopy(tiny_model), saved)
    served.half()
    adapter = next(iter(served.adapter_modules("default").values()))
    assert (adapter.scale_in.dtype, adapter.scale_mid.dtype) == (torch.int8, torch.float32)
    served.save_pretrained(tmp_path / "again")
    names = ("lordba_model.safetensors",)
    assert all((tmp_path / "again" / n).read_bytes() == (saved / n).read_bytes() for n in names)
    trainable = LoRDBAModel.from_pretrained(copy.deepcopy(tiny_model), saved, is_trainable=True)
    with pytest.raises(AdapterStateError, match="form it was saved from"):
        trainable.load_state_dict(served.state_dict())


@pytest.mark.parametrize(
    "kind, value, match",
    [
        ("scale_mid", float("nan"), "NaN or infinite"),
        ("scale_mid", float("inf"), "NaN or infinite"),
        ("scale_in", -128, "outside the format's range"),
        ("scale_out", None, "missing"),
    ],
)
def test_load_adapter_state_refuses_what_a_file_load_refuses(kind, value, match):
    # An in-memory state gets the checks a file's tensors get: a NaN scale loaded silently gave wrong outputs.
    import copy

    from lordba import AdapterFormatError

    state = randomized({"scale_dtype": "int8"}).adapter_state()
    rec = copy.deepcopy(state.modules["model.layers.0.self_attn.q_proj"])
    if value is None:
        del rec.tensors[kind]
    else:
        rec.tensors[kind][0] = value
    state.modules[rec.path] = rec
    lm = LoRDBAModel(tiny_llama(0))
    with pytest.raises(AdapterFormatError, match=rf"load_adapter_state.*q_proj\.{kind}.*{match}"):
        lm.load_adapter_state(state, "x")
    assert not lm.peft_config and not lm._lordba_layers()


def test_an_adapter_added_under_inference_mode_is_ordinary_tensors_and_trains(tiny_model, input_ids):
    """``get_lordba_model`` / ``add_adapter`` called under ``torch.inference_mode`` (loading a model for
    inference, then training it after all) makes ordinary parameters: an inference tensor cannot be saved for
    backward. Grad mode inside stays off, as the caller's was."""
    with torch.inference_mode():
        lm = get_lordba_model(tiny_model, LoRDBAConfig(r=4, init="random"))
    params = [p for p in lm.parameters() if p.requires_grad]
    assert params and not any(p.is_inference() for p in params)
    lm(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize("backend", ["none", "q4", "hqq"])
def test_every_adapter_operation_runs_under_inference_mode(tmp_path, backend):
    """A model made, quantized, adapted, packed, saved, merged, hot-swapped, loaded, unpacked and frozen, all
    under ``torch.inference_mode``: the adapters' tensors are ordinary ones (their caches read version
    counters, which inference tensors lack: unpacking to latents then a forward raised), and the forwards run."""
    from lordba import kernels
    from lordba.quant import quantize_model

    if backend == "q4" and not kernels.cpu_available():
        pytest.skip("compiled CPU kernels unavailable")
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(0))

    def base():
        model = tiny_llama(0)
        return (
            model
            if backend == "none"
            else quantize_model(model, backend=backend, group_size=64 if backend == "q4" else 8)
        )

    with torch.inference_mode():
        lm = get_lordba_model(base(), LoRDBAConfig(r=4, init="random"))
        lm.pack()
        want = lm(input_ids=ids).logits
        lm.save_pretrained(tmp_path / "a")
        lm.merge_adapter()
        lm.unmerge_adapter()
        lm.hotswap_adapter(tmp_path / "a", "default")
        lm.load_adapter(tmp_path / "a", "b")
        lm.set_adapter("b")
        torch.testing.assert_close(lm(input_ids=ids).logits, want)  # merged and unmerged: float rounding
        lm.unpack_to_latent("b")
        lm(input_ids=ids)
        lm.freeze_signs("b")
        lm(input_ids=ids)
        loaded = LoRDBAModel.from_pretrained(base(), tmp_path / "a")
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
    adapters = [a for name in ("default", "b") for a in lm.adapter_modules(name).values()]
    adapters += list(loaded.adapter_modules("default").values())
    assert not any(t.is_inference() for a in adapters for t in (*a.parameters(), *a.buffers()))


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_a_forward_under_inference_mode_leaves_nothing_that_breaks_training(input_ids, scale_dtype):
    """Forwards under ``torch.inference_mode`` (one adapter, a mixed batch) before training the same adapters: what
    they cache (the mixed batch's row indices, decoded scales, packed signs) is made for the later training forward
    too, so it must be ordinary tensors (an inference tensor cannot be saved for backward: the mixed batch's
    training forward raised). The gradients equal those of a model that never ran under inference mode."""

    def two(seed=3):
        lm = randomized({"scale_dtype": scale_dtype})
        torch.manual_seed(seed)
        lm.add_adapter("b", LoRDBAConfig(r=4, init="random", scale_dtype=scale_dtype))
        return lm

    def grads(lm):
        lm.zero_grad()
        lm(input_ids=input_ids, labels=input_ids, adapter_names=["default", "b", "__base__"]).loss.backward()
        lm(input_ids=input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    from lordba.nn import routing

    routing._ROUTES.clear()  # the row indices are shared by every model: first made here, under inference mode
    lm = two()
    with torch.inference_mode():
        lm(input_ids=input_ids, adapter_names=["default", "b", "__base__"])
        lm(input_ids=input_ids)
    got = grads(lm)
    want = grads(two())
    assert got.keys() == want.keys() and any(".b." in n for n in got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_torch_save_takes_a_packed_model_and_its_state_dict(tmp_path):
    """An inference-form adapter's tensors, and a q4 base's weights, are views of one buffer of several dtypes,
    which ``torch.save`` refused ("Cannot save multiple tensors or storages that view the same data as different
    types"): ``torch.save(model.state_dict())`` and ``torch.save(model)`` of a packed model failed."""
    import io

    from conftest import tiny_q4

    lm = tiny_q4(adapter=True)
    ids = torch.tensor([[5, 17, 3]])
    with torch.no_grad():
        want = lm(input_ids=ids).logits
    saved = io.BytesIO()
    torch.save(lm.state_dict(), saved)
    saved.seek(0)
    fresh = tiny_q4(adapter=True)
    for a in fresh.adapter_modules("default").values():
        a.sign_A.zero_()  # (another adapter until the state dict is loaded)
    fresh.load_state_dict(torch.load(saved))
    whole = io.BytesIO()
    torch.save(lm, whole)
    whole.seek(0)
    copied = torch.load(whole, weights_only=False)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
        assert torch.equal(copied(input_ids=ids).logits, want)
        assert torch.equal(lm(input_ids=ids).logits, want)  # the original untouched


def test_deleting_a_merged_adapter_is_refused_and_changes_nothing():
    """A refused delete of a merged adapter left it out of the active adapters of the layers before the first one
    holding it (here every q_proj): a refused call changed the model, and its status said ``"irregular"``."""
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, target_modules=["q_proj"]), "a")
    lm.add_adapter("b", LoRDBAConfig(r=2, target_modules=["v_proj"]))
    lm.set_adapter(["a", "b"])
    lm.merge_adapter(["b"])
    with pytest.raises(AdapterStateError, match="'b' is merged"):
        lm.delete_adapter("b")
    assert all(layer.active_adapters == ["a", "b"] for _, layer in lm._lordba_layers())
    assert lm.get_model_status().active_adapters == ["a", "b"]


def test_load_state_dict_into_a_merged_adapter_is_refused_and_unmerge_restores_the_base():
    """``load_state_dict`` of a merged adapter's tensors is refused: they were replaced under the merged update, and
    unmerge_adapter() then took the new update out of the base weights (wrong by up to 17.7, weights of 0.09)."""
    lm = randomized()
    other = randomized(adapter_seed=6)
    before = {n: p.clone() for n, p in lm.base_model.named_parameters() if "lordba" not in n}
    lm.merge_adapter()
    with pytest.raises(AdapterStateError, match="merged"):
        lm.load_state_dict(other.state_dict())
    lm.unmerge_adapter()
    for n, p in lm.base_model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    lm.load_state_dict(other.state_dict())  # unmerged: loads


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("wrong", ["dtype", "shape"])
def test_a_refused_load_state_dict_loads_nothing(packed, wrong):
    """Each adapter checked its tensors when torch's walk reached it: a state dict whose last module (the last
    down_proj) held a scale of another form (float32 into int8 codes) or size was refused there, after the 13 modules
    before it had loaded theirs (26 of the model's 70 tensors changed: an adapter neither old nor new)."""
    lm = randomized({"scale_dtype": "int8"})
    other = randomized({"scale_dtype": "int8"}, adapter_seed=6)
    if packed:
        lm.pack()
        other.pack()
    given = other.state_dict()
    key = "base_model.model.layers.1.mlp.down_proj.lordba_adapters.default.scale_in"
    given[key] = given[key].float() if wrong == "dtype" else torch.ones(given[key].shape[0] + 1, dtype=given[key].dtype)
    if wrong == "dtype" and not packed:
        given[key] = given[key].to(torch.int8)  # codes into float scale parameters
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    assert any(not torch.equal(v, before[k]) for k, v in given.items() if k != key)
    with pytest.raises(AdapterStateError, match=key.replace(".", r"\.")):
        lm.load_state_dict(given)
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())


def test_a_failed_from_pretrained_leaves_the_callers_model_as_it_was(tmp_path):
    """The wrapper freezes the base's parameters; a load that then fails (here a folder with no adapter) left the
    caller's model frozen."""
    from lordba.errors import LoRDBAError

    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(before.values())
    with pytest.raises(LoRDBAError):
        LoRDBAModel.from_pretrained(model, tmp_path)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(isinstance(m, LoRDBALinear) for m in model.modules())


@pytest.mark.parametrize("config", [{"target_modules": ["nonexistent"]}, {"modules_to_save": ["nonexistent"]}])
def test_a_refused_get_lordba_model_leaves_the_callers_model_trainable(config):
    """The wrapper froze the base's parameters before adding the adapter; a config refused then (a target or a module
    to save that matches nothing) left every parameter of the caller's model frozen (0 of 21 trainable), where
    PEFT's get_peft_model leaves the model as it was."""
    from lordba.errors import LoRDBAError

    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(LoRDBAError):
        get_lordba_model(model, LoRDBAConfig(**{"r": 4, **config}))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(isinstance(m, LoRDBALinear) for m in model.modules())


def test_a_model_with_layers_offloaded_by_accelerate_adapts_trains_generates_saves_and_loads(tmp_path, input_ids):
    """``from_pretrained(device_map=..., offload_folder=...)`` leaves an offloaded layer's weights on ``meta``
    (accelerate's hook brings them in for each call): the adapters of those layers were made on ``meta`` too, and
    the first forward failed inside a kernel ("aten::equal ... Meta tensors"). They are made where the hook
    computes; everything equals the same model held in memory. A meta weight no hook loads is refused by name."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from lordba.errors import TargetModulesError

    tiny_llama(0).save_pretrained(tmp_path / "base")
    parts = ("model.embed_tokens", "model.layers.0", "model.norm", "model.rotary_emb", "lm_head")
    offloaded = {**dict.fromkeys(parts, "cpu"), "model.layers.1": "disk"}

    def run(device_map):
        kw = {"device_map": device_map, "offload_folder": str(tmp_path / "offload")} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", **kw).eval()
        torch.manual_seed(5)
        lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random"))
        out = logits(lm, input_ids)
        tokens = lm.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False)
        lm.train()
        loss = lm(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grads = [p.grad for n, p in lm.named_parameters() if p.requires_grad and "layers.1." in n]
        lm.eval()
        lm.save_pretrained(tmp_path / str(bool(device_map)))
        again = LoRDBAModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tmp_path / "base", **kw).eval(), tmp_path / str(bool(device_map))
        )
        return out, tokens, loss.detach(), grads, logits(again, input_ids), lm

    want = run(None)
    got = run(offloaded)
    assert got[-1].base_model.model.layers[1].self_attn.q_proj.base_layer.weight.is_meta
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.equal(got[1], want[1])
    assert torch.allclose(got[2], want[2], atol=1e-5)
    assert len(got[3]) == len(want[3]) > 0 and all(g is not None and w is not None for g, w in zip(got[3], want[3]))
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got[3], want[3]))
    assert torch.allclose(got[4], want[4], atol=1e-5)

    empty = tiny_llama(0)
    empty.model.layers[1].mlp.up_proj.to("meta")
    with pytest.raises(TargetModulesError, match=r"model\.layers\.1\.mlp\.up_proj.*meta"):
        get_lordba_model(empty, LoRDBAConfig(r=2))


def test_set_adapter_refuses_a_name_twice_and_names_that_are_not_strings(input_ids):
    # ["default", "default"] used to stack the adapter with itself: its branch was added twice, silently.
    lm = randomized()
    want = logits(lm, input_ids)
    with pytest.raises(ConfigError, match="'default' named more than once"):
        lm.set_adapter(["default", "default"])
    assert lm.active_adapters == ["default"]
    torch.testing.assert_close(logits(lm, input_ids), want)
    for bad in (None, 5, [None], [["default"]], ("default", 1)):  # a TypeError ('not iterable', 'unhashable')
        with pytest.raises(ConfigError, match="adapter name"):
            lm.set_adapter(bad)
    for call in (lm.delete_adapter, lm.adapter_modules, lm.freeze_signs):
        with pytest.raises(ConfigError, match="adapter name"):
            call(["default"])
    assert lm.active_adapters == ["default"] and list(lm.peft_config) == ["default"]


def test_a_model_that_is_not_a_module_and_a_state_that_is_not_an_adapter_state_are_named(tmp_path):
    # get_lordba_model(None, ...) / from_pretrained(None, ...): AttributeError 'NoneType' object has no attribute
    # 'modules'; load_adapter_state(None, ...): AttributeError 'NoneType' object has no attribute 'extras'.
    lm = randomized()
    lm.save_pretrained(tmp_path / "a")
    for model in (None, "meta-llama/Llama-3.2-1B"):
        with pytest.raises(ConfigError, match=r"nn\.Module"):
            get_lordba_model(model, LoRDBAConfig(r=2))
        with pytest.raises(ConfigError, match=r"nn\.Module"):
            LoRDBAModel.from_pretrained(model, tmp_path / "a")
    with pytest.raises(ConfigError, match="AdapterState"):
        lm.load_adapter_state(None, "b")
    assert list(lm.peft_config) == ["default"]


def test_unpack_to_latent_and_set_trainable_name_bad_arguments(input_ids):
    # unpack_to_latent(name, 0.0) made every latent 0, so every sign +1: a different adapter, silently (nan: NaN
    # latents). set_trainable(name, signs="no") raised TypeError from requires_grad_ after changing the adapter's form.
    lm = randomized()
    lm.pack()
    want = logits(lm, input_ids)
    for magnitude in (0.0, -0.01, float("nan"), float("inf"), "0.01", None):
        with pytest.raises(ConfigError, match="magnitude"):
            lm.unpack_to_latent("default", magnitude)
    for kwargs in ({"signs": "no"}, {"scales": None}, {"signs": False, "scales": 1}):
        with pytest.raises(ConfigError, match="set_trainable"):
            lm.set_trainable("default", **kwargs)
    assert all(isinstance(a, PackedAdapter) for a in lm.adapter_modules("default").values())  # unchanged
    torch.testing.assert_close(logits(lm, input_ids), want)
    lm.unpack_to_latent("default", 0.5)
    torch.testing.assert_close(logits(lm, input_ids), want)


def test_pack_of_an_empty_name_is_refused_and_packs_nothing():
    """``pack("")`` (a name computed as empty) packed every adapter, their latents dropped: as any other name that
    is not an adapter's, it is refused, every adapter left in its training form."""
    lm = randomized()
    lm.add_adapter("b", LoRDBAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match="unknown adapter ''"):
        lm.pack("")
    assert all(isinstance(a, TrainableAdapter) for n in ("default", "b") for a in lm.adapter_modules(n).values())
    lm.pack("b")
    assert all(isinstance(a, PackedAdapter) for a in lm.adapter_modules("b").values())
    assert all(isinstance(a, TrainableAdapter) for a in lm.adapter_modules("default").values())


def test_a_path_that_is_not_a_path_is_named(tmp_path):
    # None (or a number) as the directory: TypeError 'expected str, bytes or os.PathLike object, not NoneType'
    # from pathlib, naming neither the call nor the argument; export_lora converted everything first.
    from lordba import AdapterFormatError, export_lora, read_adapter

    lm = randomized()
    lm.save_pretrained(tmp_path / "a")
    for bad in (None, 3):
        with pytest.raises(AdapterFormatError, match="save_directory"):
            lm.save_pretrained(bad)
        with pytest.raises(AdapterFormatError, match="adapter directory"):
            lm.load_adapter(bad, adapter_name="b")
        with pytest.raises(AdapterFormatError, match="adapter directory"):
            LoRDBAModel.from_pretrained(tiny_llama(), bad)
        with pytest.raises(AdapterFormatError, match="adapter directory"):
            read_adapter(bad)
        with pytest.raises(AdapterFormatError, match="out_dir"):
            export_lora(tmp_path / "a", bad)
    assert list(lm.peft_config) == ["default"]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_a_routed_training_call_under_gradient_checkpointing_is_refused(input_ids):
    """Gradient checkpointing recomputes each layer in backward, after the call has ended, so with the
    active adapters, not the call's ``adapter_names`` or ``disable_adapter()`` block: the mixed batch's
    adapter ``b`` got no gradient and the others wrong ones, silently. Such a call is refused (as PEFT
    refuses ``adapter_names`` in training); without gradients, or without checkpointing, it runs."""
    lm = randomized()
    lm.add_adapter("b", LoRDBAConfig(r=2, init="random"))
    lm.train()
    names = ["b", "default", "__base__"]
    lm(input_ids=input_ids, labels=input_ids, adapter_names=names).loss.backward()  # no checkpointing: allowed
    with warnings.catch_warnings():  # transformers 5's deprecated names (removed in v6: the check would be lost)
        warnings.simplefilter("error", FutureWarning)
        lm.gradient_checkpointing_enable()
        with pytest.raises(AdapterStateError, match="gradient checkpointing"):
            lm(input_ids=input_ids, labels=input_ids, adapter_names=names)
    with pytest.raises(AdapterStateError, match="gradient checkpointing"), lm.disable_adapter():
        lm(input_ids=input_ids, labels=input_ids)
    with torch.no_grad():
        lm(input_ids=input_ids, adapter_names=names)
        with lm.disable_adapter():
            lm(input_ids=input_ids)
    lm(input_ids=input_ids, labels=input_ids).loss.backward()  # the active adapter: recomputed the same
    lm.eval()
    lm(input_ids=input_ids, adapter_names=names)  # eval mode: transformers does not checkpoint


def test_gradient_checkpointing_enable_keeps_transformers_default(input_ids):
    """``gradient_checkpointing_enable()`` without arguments leaves the checkpointing arguments to transformers
    (its default names ``use_reentrant``): the wrapper passed ``{}``, so every checkpointed layer called
    ``torch.utils.checkpoint`` without ``use_reentrant``, which torch warns "will raise an exception". Gradients still
    reach the adapter of the frozen base."""
    lm = randomized()
    lm.train()
    lm.gradient_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm(input_ids=input_ids, labels=input_ids).loss.backward()
    assert not [w for w in caught if "use_reentrant" in str(w.message)]
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)


def test_set_adapter_unmerges_adapters_it_does_not_activate(input_ids):
    """``set_adapter`` after ``merge_adapter`` to adapters without the merged one takes the merged one out first,
    with a warning (PEFT unmerges too): it stayed in the base weights, so the model ran ``default`` + ``b`` while
    ``active_adapters`` said ``["b"]``, silently. A merged adapter that stays active stays merged."""
    lm = randomized()
    lm.add_adapter("b", LoRDBAConfig(r=2, init="random"))
    lm.set_adapter("b")
    want = logits(lm, input_ids)
    lm.set_adapter("default")
    lm.merge_adapter()
    lm.set_adapter(["default", "b"])  # the merged adapter stays active: it stays merged
    assert lm.get_model_status().merged_adapters == ["default"]
    with pytest.warns(UserWarning, match="unmerg"):
        lm.set_adapter("b")
    assert lm.get_model_status().merged_adapters == []
    torch.testing.assert_close(logits(lm, input_ids), want, rtol=0, atol=1e-5)


def test_adapter_names_that_are_not_strings_are_a_config_error(input_ids):
    """An entry that is not a name (a list, as a nested batch of names) failed deep in the routing cache with a bare
    ``TypeError: unhashable type``; it is a ConfigError saying what is expected."""
    lm = randomized()
    with pytest.raises(ConfigError, match="one adapter name \\(a string\\) per batch row"):
        lm(input_ids=input_ids[:2], adapter_names=[["default"], "default"])


def test_state_dict_inside_ddp_holds_the_adapters_only_and_loads_back(tmp_path):
    """Wrapped in ``DistributedDataParallel`` (whose ``state_dict`` has its children fill one dict), the model's
    state dict held the whole base too (121 tensors for the adapters' 70 on a q4 base), and with a packed adapter
    ``torch.save(ddp.state_dict())`` failed ("Cannot save multiple tensors or storages that view the same data as
    different types"). Now it holds what ``lm.state_dict()`` holds, and ``ddp.load_state_dict`` takes it."""
    import io

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from conftest import tiny_q4

    def model():
        lm = tiny_q4(adapter=True)  # a q4 base, a packed adapter "default"
        torch.manual_seed(1)
        lm.add_adapter("t", LoRDBAConfig(r=2, init="random"))
        lm.set_adapter(["default", "t"])
        return lm

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        lm, other = model(), model()
        with torch.no_grad():
            for p in other.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        ddp, ddp_other = DistributedDataParallel(lm), DistributedDataParallel(other)
        state = ddp.state_dict()
        assert set(state) == {f"module.{k}" for k in lm.state_dict()}
        saved = io.BytesIO()
        torch.save(state, saved)
        saved.seek(0)
        ddp_other.load_state_dict(torch.load(saved))  # strict: the base's keys are not missing
        for k, v in lm.state_dict().items():
            assert torch.equal(other.state_dict()[k], v), k
    finally:
        dist.destroy_process_group()
