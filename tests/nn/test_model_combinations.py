"""Features combined as users combine them, each pair checked end to end against a result computed another way
(the adapter alone, the dense ΔW, the unquantized or eager model, a fresh load): scale formats × combination ×
saving, modules trained in full × hot-swap × merging, mixed batches × merging × disabling, training forms × scale
formats × saving, a q4 base × trained biases × FastDecode, gradient checkpointing × modules trained in full."""

import filecmp
import warnings

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from lordba import (
    AdapterStateError,
    LoRDBAConfig,
    LoRDBAModel,
    get_lordba_model,
    get_lordba_model_state_dict,
    set_lordba_model_state_dict,
)
from lordba.quant import quantize_model, set_compute
from lordba.train.hf_trainer import LoRDBACallback

from conftest import TINY, tiny_llama, tiny_q4

IDS = torch.randint(0, TINY["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(11))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def deltas(lm, name):
    return {p: a.delta_weight() for p, a in lm.adapter_modules(name).items()}


def biased():
    """The tiny Llama with biases on every projection (``bias="lora_only"`` trains them)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)).eval()


def q4(model):
    base = quantize_model(model, backend="q4", group_size=64)
    set_compute(base, "exact")
    return base


def test_int8_scales_combined_by_cat_save_and_load_as_the_weighted_sum(tmp_path):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype="int8"))
    lm.pack()
    lm.add_weighted_adapter(["default", "default"], [0.7, 0.5], "c")  # proportional scales: exact
    one = deltas(lm, "default")
    for path, delta in deltas(lm, "c").items():
        torch.testing.assert_close(delta, 1.2 * one[path], rtol=0, atol=1e-6)
    lm.set_adapter("c")
    want = logits(lm)
    lm.save_pretrained(tmp_path, selected_adapters=["c"])  # the compact format (version 3)
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "c")
    assert loaded.peft_config["default"].scale_dtype == "int8"
    assert torch.equal(logits(loaded), want)


def test_adapters_on_other_layers_with_patterns_combine_per_module_and_reload(tmp_path):
    cfg = LoRDBAConfig(
        r=4, alpha=8, init="random", layers_to_transform=[0], alpha_pattern={"q_proj": 2.0}, rank_pattern={"v_proj": 2}
    )
    lm = get_lordba_model(tiny_llama(0), cfg)
    lm.add_adapter("b", LoRDBAConfig(r=2, alpha=3, init="random", layers_to_transform=[1], target_modules=["q_proj"]))
    lm.pack()
    a, b = deltas(lm, "default"), deltas(lm, "b")
    lm.add_weighted_adapter(["default", "b"], [0.5, -2.0], "c", combination_type="cat")
    c = deltas(lm, "c")
    assert set(c) == set(a) | set(b)
    for path, delta in c.items():
        want = 0.5 * a.get(path, 0) - 2.0 * b.get(path, 0)
        torch.testing.assert_close(delta, want, rtol=0, atol=1e-5)
    lm.set_adapter("c")
    lm.save_pretrained(tmp_path, selected_adapters=["c"])
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "c")
    assert {p: x.r for p, x in loaded.adapter_modules("default").items()} == {
        p: x.r for p, x in lm.adapter_modules("c").items()
    }
    assert torch.equal(logits(loaded), logits(lm))


def test_modules_to_save_hotswapped_then_merged_and_unloaded_give_the_saved_adapters_outputs(tmp_path):
    cfg = LoRDBAConfig(r=4, init="random", modules_to_save=["lm_head"])
    torch.manual_seed(1)
    lm = get_lordba_model(tiny_llama(0), cfg)
    with torch.no_grad():
        lm.base_model.lm_head.lordba_saved["default"].weight.add_(0.1)
    lm.pack()
    want = logits(lm)
    lm.save_pretrained(tmp_path)
    torch.manual_seed(2)
    other = get_lordba_model(tiny_llama(0), cfg)
    other.pack()
    assert (logits(other) - want).abs().max() > 0.05
    other.hotswap_adapter(tmp_path)
    torch.testing.assert_close(logits(other), want, rtol=0, atol=1e-6)
    merged = other.merge_and_unload()
    assert type(merged.lm_head) is torch.nn.Linear
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-5)


def test_a_mixed_batch_is_refused_while_merged_and_runs_the_base_in_a_disable_block():
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random"))
    lm.pack()
    base = logits(tiny_llama(0))
    one = logits(lm)
    lm.set_adapter("b")
    two = logits(lm)
    lm.set_adapter(["default", "b"])  # stacked: the rows named run their own adapter alone
    with torch.no_grad():
        mixed = lm(input_ids=IDS, adapter_names=["b", "default", "__base__"]).logits
    torch.testing.assert_close(mixed[0], two[0], rtol=0, atol=1e-5)  # (the single adapter's fused call rounds
    torch.testing.assert_close(mixed[1], one[1], rtol=0, atol=1e-5)  # otherwise: tests/nn/test_model.py's bound)
    assert torch.equal(mixed[2], base[2])
    with lm.disable_adapter(), torch.no_grad():
        assert torch.equal(lm(input_ids=IDS, adapter_names=["b", "default", "b"]).logits, base)
    lm.set_adapter("default")
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm), one, rtol=0, atol=1e-5)
    with pytest.raises(AdapterStateError, match="unmerge"), torch.no_grad():
        lm(input_ids=IDS, adapter_names=["b", "default", "__base__"])
    lm.unmerge_adapter()
    torch.testing.assert_close(logits(lm), one, rtol=0, atol=1e-5)


def test_stacked_adapters_merge_and_unload_into_their_sum():
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random"))
    lm.pack()
    lm.set_adapter(["default", "b"])
    stacked = logits(lm)
    torch.testing.assert_close(logits(lm.merge_and_unload()), stacked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_with_int8_scales_packs_to_the_same_outputs(dtype):
    lm = get_lordba_model(tiny_llama(0).to(dtype), LoRDBAConfig(r=4, init="random", scale_dtype="int8"))
    trained = logits(lm)
    lm.pack()
    assert torch.equal(logits(lm), trained)
    assert (trained.float() - logits(tiny_llama(0).to(dtype)).float()).abs().max() > 0.05


def test_a_q4_base_merged_and_unmerged_is_restored_bit_for_bit():
    lm = tiny_q4(adapter=True)
    before = {k: v.clone() for k, v in lm.base_model.state_dict().items()}
    want = logits(lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the requantization warning (tests/nn/test_merge.py)
        lm.merge_adapter()
    lm.unmerge_adapter()
    after = lm.base_model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(lm), want)


@pytest.mark.parametrize("scale_dtype", ["int4", "int8", "bfloat16"])
def test_unpacking_to_latent_and_freezing_signs_save_the_same_bytes(tmp_path, scale_dtype):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype=scale_dtype))
    lm.pack()
    want = logits(lm)
    lm.save_pretrained(tmp_path / "packed")
    lm.unpack_to_latent("default")
    assert torch.equal(logits(lm), want)
    lm.save_pretrained(tmp_path / "latent")
    lm.freeze_signs("default")
    lm.save_pretrained(tmp_path / "frozen")
    for form in ("latent", "frozen"):
        assert filecmp.cmp(
            tmp_path / "packed" / "lordba_model.safetensors",
            tmp_path / form / "lordba_model.safetensors",
            shallow=False,
        )


def _step(lm, lr=0.1):
    lm.train()
    optimizer = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=lr)
    lm(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    lm.eval()


def test_a_packed_int8_adapter_resumed_as_latent_trains_and_saves_what_it_computes(tmp_path):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype="int8"))
    lm.pack()
    before = logits(lm)
    lm.unpack_to_latent("default")
    _step(lm)
    trained = logits(lm)
    assert (trained - before).abs().max() > 0.01
    lm.save_pretrained(tmp_path)
    assert torch.equal(logits(LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)), trained)


def test_frozen_signs_train_the_scales_only_and_save_what_they_compute(tmp_path):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    signs = {p: a.signs() for p, a in lm.adapter_modules("default").items()}
    lm.freeze_signs("default")
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[1] in ("scale_in", "scale_mid", "scale_out") for n in trainable)
    before = logits(lm)
    _step(lm, lr=0.5)
    trained = logits(lm)
    assert (trained - before).abs().max() > 0.01
    for path, adapter in lm.adapter_modules("default").items():
        assert all(torch.equal(x, y) for x, y in zip(adapter.signs(), signs[path]))
    lm.save_pretrained(tmp_path)
    assert torch.equal(logits(LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)), trained)


def test_a_packed_int8_state_dict_loads_into_a_trainable_adapter():
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype="int8"))
    lm.pack()
    want = logits(lm)
    torch.manual_seed(9)
    other = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", scale_dtype="int8"))
    set_lordba_model_state_dict(other, get_lordba_model_state_dict(lm))
    assert torch.equal(logits(other), want)


@pytest.mark.parametrize("pack", [False, True])
def test_a_mixed_batch_routes_modules_to_save_and_trained_biases_per_row(pack):
    lm = get_lordba_model(biased(), LoRDBAConfig(r=4, init="random", modules_to_save=["lm_head"], bias="lora_only"))
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random", modules_to_save=["lm_head"], bias="lora_only"))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lordba_saved" in name:
                p.add_(torch.randn_like(p) * 0.2)
        for name in ("default", "b"):
            for adapter in lm.adapter_modules(name).values():
                adapter.bias_delta.normal_()
    lm.eval()
    if pack:
        lm.pack()
    one = logits(lm)
    lm.set_adapter("b")
    two = logits(lm)
    base = logits(biased())
    with lm.disable_adapter():
        assert torch.equal(logits(lm), base)
    with torch.no_grad():
        mixed = lm(input_ids=IDS, adapter_names=["default", "b", "__base__"]).logits
    torch.testing.assert_close(mixed[0], one[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], two[1], rtol=0, atol=1e-5)
    assert torch.equal(mixed[2], base[2])


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}])
def test_gradient_checkpointing_on_a_q4_base_gives_the_same_gradients_to_modules_to_save(kwargs):
    def gradients(checkpointing):
        torch.manual_seed(5)
        cfg = LoRDBAConfig(r=4, init="random", modules_to_save=["model.norm"], target_modules=["q_proj", "v_proj"])
        lm = get_lordba_model(q4(tiny_llama(0)), cfg)
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        lm.train()
        lm(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert any("lordba_saved" in n for n in plain) and set(plain) == set(checkpointed)
    for name, grad in plain.items():
        assert grad is not None and torch.equal(checkpointed[name], grad), name


@pytest.mark.parametrize("scale_dtype", ["int8", "int4"])
def test_hotswapping_another_scale_format_generates_as_a_fresh_load(tmp_path, scale_dtype):
    torch.manual_seed(1)
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random")).save_pretrained(tmp_path / "a")
    torch.manual_seed(2)
    cfg = LoRDBAConfig(r=4, init="random", scale_dtype=scale_dtype, target_modules=["q_proj", "v_proj", "up_proj"])
    get_lordba_model(tiny_llama(0), cfg).save_pretrained(tmp_path / "b")
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        lm.generate(input_ids=IDS[:1], **kw)  # the decode calls kept for the first adapter
        lm.hotswap_adapter(tmp_path / "b")  # a subset of its modules, other scales
        fresh = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "b")
        assert torch.equal(logits(lm), logits(fresh))
        assert torch.equal(lm.generate(input_ids=IDS[:1], **kw), fresh.generate(input_ids=IDS[:1], **kw))


class _Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = IDS[i % 3]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_a_config_from_peft_trains_in_the_hf_trainer_and_saves_what_it_computes(tmp_path):
    peft = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, layers_to_transform=[1]
    )
    torch.manual_seed(0)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig.from_peft(peft))
    assert {p: a.r for p, a in lm.adapter_modules("default").items()} == {
        "model.layers.1.self_attn.q_proj": 4,
        "model.layers.1.self_attn.v_proj": 2,
    }
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=4,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    Trainer(model=lm, args=args, train_dataset=_Rows(), callbacks=[LoRDBACallback()]).train()
    lm.eval()
    trained = logits(lm)
    assert (trained - logits(tiny_llama(0))).abs().max() > 1e-3
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-4"):
        assert torch.equal(logits(LoRDBAModel.from_pretrained(tiny_llama(0), folder)), trained)


@pytest.mark.long
def test_compiled_model_follows_set_adapter_and_delete_adapter():
    torch._dynamo.reset()
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random"))
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random"))
    lm.pack()
    want = {}
    for name in ("default", "b"):
        lm.set_adapter(name)
        want[name] = logits(lm)
    compiled = torch.compile(lm)
    try:
        torch.testing.assert_close(logits(compiled), want["b"], rtol=0, atol=1e-5)
        lm.set_adapter("default")
        torch.testing.assert_close(logits(compiled), want["default"], rtol=0, atol=1e-5)
        lm.delete_adapter("b")
        torch.testing.assert_close(logits(compiled), want["default"], rtol=0, atol=1e-5)
        lm.delete_adapter("default")  # the only active one, the last: the base runs
        torch.testing.assert_close(logits(compiled), logits(tiny_llama(0)), rtol=0, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.long
def test_a_q4_base_with_trained_biases_saved_loaded_and_decoded_compiled_gives_the_eager_tokens(tmp_path):
    from lordba.nn.decode import FastDecode

    torch.manual_seed(3)
    lm = get_lordba_model(q4(biased()), LoRDBAConfig(r=4, init="random", bias="lora_only"))
    with torch.no_grad():
        for adapter in lm.adapter_modules("default").values():
            adapter.scale_out.mul_(30)
            adapter.bias_delta.normal_()
    lm.eval()
    trained = logits(lm)
    lm.pack()
    assert torch.equal(logits(lm), trained)
    lm.save_pretrained(tmp_path)
    loaded = LoRDBAModel.from_pretrained(q4(biased()), tmp_path).eval()
    assert torch.equal(logits(loaded), trained)
    prompt = IDS[:1]
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, min_new_tokens=6)
    kw["attention_mask"] = torch.ones_like(prompt)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = loaded.generate(input_ids=prompt, max_new_tokens=6, **kw)
            with loaded.disable_adapter():
                off = loaded.generate(input_ids=prompt, max_new_tokens=6, **kw)
            decode = FastDecode(loaded)
            got = decode.generate(prompt, 6, **kw)
    finally:
        torch._dynamo.reset()
    assert decode.failure is None and not torch.equal(want.sequences, off.sequences)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
