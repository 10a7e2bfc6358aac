"""PEFT features of LoRDBAModel (issue 14): modules trained in full and trained biases saved with the
adapter (format version 2), dropout, layers_to_transform, the base-quantization record,
enable/disable_adapter_layers, status reports, state-dict functions, add_weighted_adapter."""

import json
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

import lordba.convert  # noqa: F401  (registers the dense combiner)
from lordba import (
    AdapterFormatError,
    AdapterStateError,
    ConfigError,
    LoRDBAConfig,
    LoRDBAModel,
    TargetModulesError,
    get_lordba_model,
    get_lordba_model_state_dict,
    set_lordba_model_state_dict,
)
from lordba.format.adapter import read_adapter
from lordba.quant import quantize_model

from conftest import TINY, load_weights, rewrite_weights, set_config, tiny_llama

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
Q = "model.layers.0.self_attn.q_proj"


def seq_cls():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=3, pad_token_id=0)).eval()


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32)).eval()


def test_seq_cls_head_trains_is_saved_and_disabling_uses_the_original(tmp_path):
    base = seq_cls()(input_ids=IDS).logits
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    head = lm.base_model.score.lordba_saved["default"].weight
    assert head.requires_grad
    lm(input_ids=IDS).logits.sum().backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    with torch.no_grad():
        head.mul_(3)
    out = lm(input_ids=IDS).logits
    with lm.disable_adapter():
        torch.testing.assert_close(lm(input_ids=IDS).logits, base, rtol=0, atol=0)
    lm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["format_version"] == 3 and saved["task_type"] == "SEQ_CLS"  # the compact file carries extras
    torch.testing.assert_close(read_adapter(tmp_path).extras["score.weight"], head.detach())
    lm2 = LoRDBAModel.from_pretrained(seq_cls(), tmp_path)
    torch.testing.assert_close(lm2(input_ids=IDS).logits, out, rtol=0, atol=1e-5)
    lm2.disable_adapter_layers()
    torch.testing.assert_close(lm2(input_ids=IDS).logits, base, rtol=0, atol=0)
    lm2.enable_adapter_layers()
    torch.testing.assert_close(lm2(input_ids=IDS).logits, out, rtol=0, atol=1e-5)


def test_extra_tensor_of_a_wrong_shape_is_refused_before_the_model_changes(tmp_path):
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", modules_to_save=["score"]))
    lm.save_pretrained(tmp_path)
    model = LlamaForSequenceClassification(LlamaConfig(**TINY, num_labels=5, pad_token_id=0))
    wrapper = LoRDBAModel(model)
    with pytest.raises(AdapterFormatError, match=r"score\.weight"):
        wrapper.load_adapter(tmp_path, "default")
    assert not wrapper.peft_config and type(model.score).__name__ == "Linear"


def test_an_extra_tensor_naming_a_buffer_is_refused_before_the_model_changes(tmp_path):
    # A buffer (the rotary embedding's inv_freq) is not a parameter a module trained in full holds:
    # refused as a format error naming the file's tensor, with the model untouched.
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path)
    tensors, metadata = load_weights(tmp_path)
    tensors["extra:model.rotary_emb.inv_freq"] = tiny_llama(0).model.rotary_emb.inv_freq.clone()
    rewrite_weights(tmp_path, tensors, metadata)
    lm = LoRDBAModel(tiny_llama(0))
    with pytest.raises(AdapterFormatError, match=r"model\.rotary_emb\.inv_freq.*no parameter"):
        lm.load_adapter(tmp_path, "x")
    assert not lm.peft_config and not lm._lordba_layers()


@pytest.mark.parametrize("how", ["load_adapter", "add_adapter"])
def test_a_module_to_save_that_carries_lordba_adapters_is_refused_before_the_model_changes(tmp_path, how):
    # Adapter "b" trains q_proj in full; on a model where adapter "a" has put a LoRDBA layer at q_proj,
    # it cannot be added, and the refusal must not leave "b" half-installed (its LoRDBA layers in place,
    # its name taken, its module trained in full missing).
    config = LoRDBAConfig(r=4, init="random", target_modules=["k_proj"], modules_to_save=[Q])
    get_lordba_model(tiny_llama(0), config).save_pretrained(tmp_path / "b")
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", target_modules=["q_proj"]), "a")
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    with torch.no_grad():
        before = lm(input_ids=IDS).logits
    with pytest.raises(TargetModulesError, match=Q):
        if how == "load_adapter":
            lm.load_adapter(tmp_path / "b", "b")
        else:
            lm.add_adapter("b", config)
    assert list(lm.peft_config) == ["a"]
    assert not any("b" in layer.lordba_adapters for _, layer in lm._lordba_layers())
    assert type(lm.base_model.model.layers[0].self_attn.k_proj).__name__ == "Linear"
    assert lm.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=IDS).logits, before)
    lm.delete_adapter("a")  # once q_proj is plain again, "b" loads under its name
    lm.load_adapter(tmp_path / "b", "b")
    assert list(lm.peft_config) == ["b"]


@pytest.mark.parametrize("saved, targets", [("self_attn", ["q_proj"]), ("layers.0", ["q_proj", "up_proj"])])
def test_a_module_to_save_above_a_target_is_refused_before_the_model_changes(tmp_path, saved, targets):
    # Training a module in full copies it: a copy of a module above a LoRDBA layer copied that layer's
    # adapter too (two adapters per targeted layer, under internal paths), and save_pretrained then failed.
    config = LoRDBAConfig(r=4, init="random", target_modules=targets, modules_to_save=[saved])
    model = tiny_llama(0)
    with pytest.raises(TargetModulesError, match="carries LoRDBA adapters"):
        get_lordba_model(model, config)
    assert not any(type(m).__name__ in ("LoRDBALinear", "SavedModule") for m in model.modules())
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", target_modules=["k_proj"]), "a")
    with pytest.raises(TargetModulesError, match="carries LoRDBA adapters"):  # another adapter's layer below it
        lm.add_adapter("b", LoRDBAConfig(r=4, init="random", target_modules=["v_proj"], modules_to_save=[saved]))
    assert list(lm.peft_config) == ["a"] and all(p.endswith("k_proj") for p in lm.adapter_modules("a"))
    lm.save_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda t, m: t.update({"extra:score.weight": t["extra:score.weight"] * float("nan")}), "NaN"),
        (lambda t, m: m.update(format_version="1"), "differs from the config's format_version 2"),
        (lambda t, m: t.update({"extra:score.weight": t["extra:score.weight"].to(torch.int8)}), "expected F32"),
        (lambda t, m: t.update({"extra:score.lordba_adapters.w": torch.zeros(2)}), "not a parameter path"),
        (lambda t, m: t.pop("extra:score.weight"), "no extra tensors"),
    ],
)
def test_extra_tensors_are_validated_like_the_rest(tmp_path, change, pattern):
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", modules_to_save=["score"]))
    lm.save_pretrained(tmp_path, format_version=1)  # the per-module layout: version 2 with extras
    tensors, metadata = load_weights(tmp_path)
    change(tensors, metadata)
    rewrite_weights(tmp_path, tensors, metadata)
    with pytest.raises(AdapterFormatError, match=pattern):
        read_adapter(tmp_path)


def test_extras_in_a_version_1_file_are_refused(tmp_path):
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", modules_to_save=["score"]))
    lm.save_pretrained(tmp_path, format_version=1)
    tensors, metadata = load_weights(tmp_path)
    rewrite_weights(tmp_path, tensors, {**metadata, "format_version": "1"})
    set_config(tmp_path, format_version=1)
    with pytest.raises(AdapterFormatError, match="need version 2"):
        read_adapter(tmp_path)


def test_an_adapter_without_extras_stays_format_version_1(tmp_path):
    get_lordba_model(tiny_llama(), LoRDBAConfig(r=2)).save_pretrained(tmp_path, format_version=1)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == 1
    assert load_weights(tmp_path)[1]["format_version"] == "1"
    set_config(tmp_path, format_version=2)  # a config that disagrees with its weights file
    with pytest.raises(AdapterFormatError, match="differs from the config's format_version 2"):
        read_adapter(tmp_path)


def test_modules_to_save_naming_nothing_is_refused():
    with pytest.raises(TargetModulesError, match="nonexistent"):
        get_lordba_model(tiny_llama(), LoRDBAConfig(r=2, modules_to_save=["nonexistent"]))


def test_bias_lora_only_trains_saves_and_reverts(tmp_path):
    base = gpt2()(input_ids=IDS).logits
    lm = get_lordba_model(gpt2(), LoRDBAConfig(r=2, bias="lora_only"))
    layer = lm.adapter_modules("default")["transformer.h.0.attn.c_attn"]
    assert layer.bias_delta.requires_grad
    with torch.no_grad():
        layer.bias_delta.normal_()
    out = lm(input_ids=IDS).logits
    assert not torch.allclose(out, base)
    lm.save_pretrained(tmp_path)
    extras = read_adapter(tmp_path).extras
    assert "transformer.h.0.attn.c_attn.bias" in extras and "transformer.h.0.ln_1.bias" not in extras
    lm2 = LoRDBAModel.from_pretrained(gpt2(), tmp_path)
    torch.testing.assert_close(lm2(input_ids=IDS).logits, out, rtol=0, atol=1e-5)
    with lm2.disable_adapter():
        torch.testing.assert_close(lm2(input_ids=IDS).logits, base, rtol=0, atol=0)


def test_bias_all_trains_every_bias(tmp_path):
    lm = get_lordba_model(gpt2(), LoRDBAConfig(r=2, bias="all"))
    with torch.no_grad():
        lm.base_model.transformer.h[0].ln_1.lordba_saved["default"].bias.add_(1.0)
    lm.save_pretrained(tmp_path)
    extras = read_adapter(tmp_path).extras
    assert "transformer.h.0.ln_1.bias" in extras and "transformer.h.0.ln_1.weight" not in extras
    torch.testing.assert_close(extras["transformer.h.0.ln_1.bias"], gpt2().transformer.h[0].ln_1.bias.detach() + 1)


def test_dropout_applies_to_the_branch_in_training_only():
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4, init="random", dropout=0.5))
    adapter = lm.adapter_modules("default")[Q]
    x = torch.randn(4, 40)
    adapter.eval()
    torch.testing.assert_close(adapter(x), adapter(x))
    adapter.train()
    torch.manual_seed(0)
    a = adapter(x)
    assert not torch.allclose(a, adapter(x))
    assert adapter.dropout == 0.5


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_a_loaded_adapter_has_the_configs_dropout_and_its_layers_mode(tmp_path, is_trainable, training):
    get_lordba_model(tiny_llama(), LoRDBAConfig(r=4, init="random", dropout=0.25)).save_pretrained(tmp_path)
    model = tiny_llama().train(training)
    model.model.layers[0].self_attn.q_proj.train(not training)  # one layer in the other mode
    lm = LoRDBAModel.from_pretrained(model, tmp_path, is_trainable=is_trainable)
    for path, adapter in lm.adapter_modules("default").items():
        assert adapter.dropout == 0.25, path
        assert adapter.training == lm.base_model.get_submodule(path).training, path
    # for inference the whole model is put in eval mode, as PEFT's load does (tests/nn/test_peft_workflows.py)
    assert lm.adapter_modules("default")[Q].training is (not training if is_trainable else False)


def test_layers_to_transform_limits_the_targets():
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=2, layers_to_transform=[1], layers_pattern="layers"))
    paths = list(lm.adapter_modules("default"))
    assert paths and all(".layers.1." in p for p in paths)


@pytest.mark.parametrize("layers_pattern", [None, "block"])
def test_layers_to_transform_picks_the_layers_peft_picks_in_a_model_with_nested_indices(layers_pattern):
    """T5's paths hold two indices (``decoder.block.1.layer.0.SelfAttention.q``): PEFT takes the layer index
    from the first one (``block``), lordba took the last (``layer``, the sub-layer): ``layers_to_transform=[1]``
    adapted the cross-attention of every decoder block instead of block 1, silently."""
    from transformers import T5Config, T5ForConditionalGeneration

    peft = pytest.importorskip("peft")

    def t5():
        torch.manual_seed(0)
        config = T5Config(vocab_size=101, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_heads=2)
        return T5ForConditionalGeneration(config).eval()

    fields = dict(target_modules=["q", "v"], layers_to_transform=[1], layers_pattern=layers_pattern)
    pm = peft.get_peft_model(t5(), peft.LoraConfig(r=2, **fields))
    theirs = sorted(n for n, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    lm = get_lordba_model(t5(), LoRDBAConfig(r=2, **fields))
    assert len(theirs) == 6 and sorted(lm.adapter_modules("default")) == theirs


def test_an_adapter_saved_with_the_earlier_layer_index_rule_still_loads(tmp_path):
    """Files written when lordba took the last numbered segment as the layer index (T5: the sub-layer) hold
    other modules than its config now selects: they load as they are (the file's modules), they are not
    refused as modules the config does not cover."""
    import dataclasses

    from transformers import T5Config, T5ForConditionalGeneration

    def t5():
        torch.manual_seed(0)
        config = T5Config(vocab_size=101, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_heads=2)
        return T5ForConditionalGeneration(config).eval()

    old_rule = r"decoder\.block\.\d\.layer\.1\.EncDecAttention\.[qv]"  # what layers_to_transform=[1] selected
    lm = get_lordba_model(t5(), LoRDBAConfig(r=2, init="random", target_modules=old_rule))
    state = lm.adapter_state("default")
    state.config = dataclasses.replace(state.config, target_modules=["q", "v"], layers_to_transform=[1])
    state.save_pretrained(tmp_path / "old")
    loaded = LoRDBAModel.from_pretrained(t5(), tmp_path / "old")
    assert sorted(loaded.adapter_modules("default")) == sorted(lm.adapter_modules("default"))


def test_base_quantization_is_recorded_and_a_different_base_warns(tmp_path):
    lm = get_lordba_model(quantize_model(tiny_llama(), "hqq", bits=4, group_size=8), LoRDBAConfig(r=2))
    assert lm.peft_config["default"].base_quantization == {"backend": "hqq", "bits": 4, "group_size": 8}
    lm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="hqq"):
        LoRDBAModel.from_pretrained(tiny_llama(), tmp_path)


def test_status_reports():
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=2))
    layers = lm.get_layer_status()
    assert layers[0].name == Q and layers[0].enabled and layers[0].active_adapters == ["default"]
    assert layers[0].requires_grad == {"default": True} and layers[0].devices == {"default": ["cpu"]}
    lm.disable_adapter_layers()
    status = lm.get_model_status()
    assert status.enabled is False and status.num_adapter_layers == len(layers)
    assert status.peft_types == {"default": "LORDBA"} and status.available_adapters == ["default"]


def test_status_of_adapters_on_different_modules_is_not_irregular():
    """Adapters targeting different modules, stacked, one merged: the model's status names them as PEFT's does (it
    said ``"irregular"`` for the active and the merged adapters: each layer listed only those it holds)."""
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=2, target_modules=["q_proj"]), "a")
    lm.add_adapter("b", LoRDBAConfig(r=2, target_modules=["v_proj"]))
    assert lm.get_model_status().active_adapters == ["a"]
    lm.set_adapter(["a", "b"])
    lm.merge_adapter(["b"])
    status = lm.get_model_status()
    assert status.active_adapters == ["a", "b"] and status.merged_adapters == ["b"]
    assert all(layer.active_adapters == ["a", "b"] for layer in lm.get_layer_status())
    lm.merge_adapter(["a"])
    assert lm.get_model_status().merged_adapters == ["a", "b"]
    lm.unmerge_adapter()
    assert lm.get_model_status().merged_adapters == []


def test_state_dict_functions_round_trip_and_refuse_bad_input():
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    sd = get_lordba_model_state_dict(lm)
    assert f"{Q}.sign_A" in sd and "extra:score.weight" in sd
    other = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    set_lordba_model_state_dict(other, sd)
    torch.testing.assert_close(other(input_ids=IDS).logits, lm(input_ids=IDS).logits, rtol=0, atol=1e-5)
    bad = dict(sd)
    bad[f"{Q}.scale_in"] = torch.full_like(sd[f"{Q}.scale_in"], float("nan"))
    with pytest.raises(AdapterFormatError, match="scale_in"):
        set_lordba_model_state_dict(other, bad)


def test_set_state_dict_returns_peft_load_result_for_a_full_and_a_partial_state_dict():
    """set_peft_model_state_dict returns the load result (missing_keys, unexpected_keys) and loads a partial state dict
    (strict=False); set_lordba_model_state_dict returned None and refused a partial one."""
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    sd = get_lordba_model_state_dict(lm)
    other = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    result = set_lordba_model_state_dict(other, sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert isinstance(result, torch.nn.modules.module._IncompatibleKeys)
    torch.testing.assert_close(other(input_ids=IDS).logits, lm(input_ids=IDS).logits, rtol=0, atol=1e-5)

    other = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    kept = {k: v.clone() for k, v in get_lordba_model_state_dict(other).items()}
    partial = {k: v for k, v in sd.items() if k.startswith(Q) and not k.endswith("scale_out")}
    partial["extra:score.weight"] = sd["extra:score.weight"]
    partial["model.layers.9.self_attn.q_proj.sign_A"] = sd[f"{Q}.sign_A"]
    missing, unexpected = set_lordba_model_state_dict(other, partial)
    assert unexpected == ["model.layers.9.self_attn.q_proj.sign_A"]
    assert missing == [k for k in sd if k not in partial] and f"{Q}.scale_out" in missing
    now = get_lordba_model_state_dict(other)
    for key, value in now.items():
        torch.testing.assert_close(value, partial[key] if key in partial else kept[key], rtol=0, atol=0)


def test_state_dict_functions_round_trip_an_adapter_hot_swapped_to_a_subset(tmp_path):
    """A hot-swap to a file with fewer modules silences the others (not part of the adapter: neither saved nor in
    get_lordba_model_state_dict); setting the adapter's own state dict back raised KeyError on the first of them,
    after the modules before it had loaded their tensors."""
    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["q_proj"])):
        torch.manual_seed(len(targets))
        made = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=targets))
        made.save_pretrained(tmp_path / name)
    lm = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path / "a")
    lm.hotswap_adapter(tmp_path / "b")
    sd = get_lordba_model_state_dict(lm)
    assert not any("v_proj" in k for k in sd)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    set_lordba_model_state_dict(lm, sd)
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())


def test_state_dict_set_into_a_merged_adapter_is_refused_and_unmerge_restores_the_base():
    """Loading new tensors into a merged adapter is refused, as hot-swapping it is: unmerge_adapter() then took the
    new update out of the base instead of the merged one, and the base weights were wrong by the difference."""
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
    other = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
    with torch.no_grad():
        for adapter in other.adapter_modules("default").values():
            adapter.scale_out.mul_(20)
    before = {n: p.clone() for n, p in lm.base_model.named_parameters() if "lordba" not in n}
    lm.merge_adapter()
    with pytest.raises(AdapterStateError, match="'default' is merged"):
        set_lordba_model_state_dict(lm, get_lordba_model_state_dict(other))
    lm.unmerge_adapter()
    for n, p in lm.base_model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def _two_adapters(shared_scales: bool):
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=3, init="random", scale_dtype="float32"), "a")
    lm.add_adapter("b", LoRDBAConfig(r=2, alpha=8.0, init="random", scale_dtype="float32"))
    with torch.no_grad():
        for path, b in lm.adapter_modules("b").items():
            a = lm.adapter_modules("a")[path]
            a.scale_out.normal_()
            a.scale_in.uniform_(0.5, 1.5)
            if shared_scales:
                b.scale_in.copy_(a.scale_in * 2)
                b.scale_out.copy_(a.scale_out * -0.5)
            else:
                b.scale_out.normal_()
    return lm


def test_cat_of_adapters_with_proportional_scales_is_exact():
    lm = _two_adapters(shared_scales=True)
    lm.add_weighted_adapter(["a", "b"], [0.7, -1.3], "c", combination_type="cat")
    for path, c in lm.adapter_modules("c").items():
        expected = (
            0.7 * lm.adapter_modules("a")[path].delta_weight() - 1.3 * lm.adapter_modules("b")[path].delta_weight()
        )
        assert c.r == 5
        torch.testing.assert_close(c.delta_weight(), expected, rtol=1e-5, atol=1e-6)


def test_cat_with_an_adapter_that_adds_nothing_is_exact():
    """An adapter weighted 0 (or one whose scales are all zero, as a cold one's output scale) adds nothing to a
    ``cat``, but its outer scales, not proportional to the others', sent every module to the solver: ``weights=[1, 0]``
    gave back "a" re-factorised (a warning and a real error) where "a" itself was exact. It is concatenated with
    ``m = 0``."""
    lm = _two_adapters(shared_scales=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.add_weighted_adapter(["a", "b"], [1.0, 0.0], "c", combination_type="cat")
        with torch.no_grad():
            for adapter in lm.adapter_modules("b").values():
                adapter.scale_out.zero_()
        lm.add_weighted_adapter(["a", "b"], [0.5, 2.0], "d", combination_type="cat")
    for path, c in lm.adapter_modules("c").items():
        want = lm.adapter_modules("a")[path].delta_weight()
        torch.testing.assert_close(c.delta_weight(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lm.adapter_modules("d")[path].delta_weight(), 0.5 * want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_other_combinations_go_through_the_solver(kind):
    lm = _two_adapters(shared_scales=False)
    with pytest.warns(UserWarning, match="re-factorised") if kind == "cat" else _nothing():
        lm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type=kind, svd_rank=5)
    c = lm.adapter_modules("c")[Q]
    target = lm.adapter_modules("a")[Q].delta_weight() + lm.adapter_modules("b")[Q].delta_weight()
    assert c.r == 5 and float((c.delta_weight() - target).norm() / target.norm()) < 0.5


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_unwrap_saved_gives_the_trained_or_the_original_module_back():
    """The hook merge_and_unload / unload call: a plain module in place of the SavedModule."""
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=2, task_type="SEQ_CLS"))
    saved = lm.base_model.score
    lm._unwrap_saved(merge=True)
    assert lm.base_model.score is saved.lordba_saved["default"]
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=2, task_type="SEQ_CLS"))
    saved = lm.base_model.score
    lm._unwrap_saved(merge=False)
    assert lm.base_model.score is saved.original_module


@pytest.mark.parametrize("quantized", [False, True])
def test_merging_keeps_a_trained_bias_and_unmerge_restores_it(quantized):
    base_model = quantize_model(tiny_llama(0), backend="q4", group_size=32) if quantized else gpt2()
    ids = IDS if not quantized else IDS % TINY["vocab_size"]
    if quantized:  # give the q4 layers a bias to train
        for module in base_model.modules():
            if hasattr(module, "qweight"):
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features), requires_grad=False)
    lm = get_lordba_model(base_model, LoRDBAConfig(r=2, bias="lora_only"))
    for adapter in lm.adapter_modules("default").values():
        with torch.no_grad():
            adapter.bias_delta.normal_()
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        biases = {n: p.clone() for n, p in lm.base_model.named_parameters() if n.endswith("bias")}
        lm.merge_adapter()
        torch.testing.assert_close(lm(input_ids=ids).logits, want, rtol=0.05, atol=0.05)
        lm.unmerge_adapter()
        for n, p in lm.base_model.named_parameters():
            if n in biases:
                assert torch.equal(p, biases[n]), n
        assert torch.equal(lm(input_ids=ids).logits, want)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_merged_trained_bias_is_saved_as_it_is_unmerged(tmp_path, bias):
    """A trained bias of an adapted layer is stored as the base bias plus its change; while merged, the base bias
    already held the change, so ``adapter_state`` (``save_pretrained``, ``export_lora``) stored it twice: the
    saved adapter, reloaded, gave logits 0.47 away from the model's (GPT-2, lora_only). So did loading another
    adapter's bias while one was merged. The bias is stored against the base's own, whatever is merged."""
    lm = get_lordba_model(gpt2(), LoRDBAConfig(r=2, init="random", bias=bias, target_modules=["c_attn"]))
    lm.add_adapter("other", LoRDBAConfig(r=2, init="random", bias="lora_only", target_modules=["c_attn"]))
    with torch.no_grad():
        for name in ("default", "other"):
            for adapter in lm.adapter_modules(name).values():
                adapter.bias_delta.normal_()
        want = lm(input_ids=IDS).logits
    unmerged = {n: lm.adapter_state(n).extras for n in ("default", "other")}
    lm.merge_adapter(["default", "other"])
    for name in ("default", "other"):
        got = lm.adapter_state(name).extras
        assert got.keys() == unmerged[name].keys()
        for key, value in got.items():
            assert torch.equal(value, unmerged[name][key]), (name, key)
    lm.save_pretrained(tmp_path / "merged", selected_adapters=["default"])
    lm.load_adapter(tmp_path / "merged", "again")  # onto the merged base
    lm.unmerge_adapter()
    for key, value in lm.adapter_state("again").extras.items():
        assert torch.equal(value, unmerged["default"][key]), key
    loaded = LoRDBAModel.from_pretrained(gpt2(), tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_plain_modules_with_the_trained_head():
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    with torch.no_grad():
        lm.base_model.score.lordba_saved["default"].weight.mul_(3)
        want = lm(input_ids=IDS).logits
    plain = lm.merge_and_unload()
    assert type(plain.score) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, want, rtol=1e-4, atol=1e-4)


def test_hotswap_loads_the_extra_tensors_in_place_and_refuses_other_ones(tmp_path):
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    other = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", task_type="SEQ_CLS"))
    with torch.no_grad():
        other.base_model.score.lordba_saved["default"].weight.mul_(5)
        want = other(input_ids=IDS).logits
    other.save_pretrained(tmp_path / "other")
    head = lm.base_model.score.lordba_saved["default"].weight
    lm.hotswap_adapter(tmp_path / "other", "default")
    assert lm.base_model.score.lordba_saved["default"].weight is head  # in place
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random")).save_pretrained(tmp_path / "plain")
    with pytest.raises(AdapterStateError, match="extra tensors"):
        lm.hotswap_adapter(tmp_path / "plain", "default")
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)  # unchanged


def test_adapter_layers_disabled_stay_disabled_for_an_adapter_added_or_loaded_on_other_modules(tmp_path):
    # Layers and modules trained in full made for a new adapter used to start enabled: with the adapters
    # disabled, an adapter added or loaded on modules no earlier adapter had wrapped changed the outputs.
    base = seq_cls()(input_ids=IDS).logits
    torch.manual_seed(1)
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", target_modules=["q_proj"]))
    torch.manual_seed(2)
    config = LoRDBAConfig(r=4, init="random", target_modules=["v_proj"], bias="all", task_type="SEQ_CLS")
    saved = get_lordba_model(seq_cls(), config)
    with torch.no_grad():
        saved.base_model.score.lordba_saved["default"].weight.mul_(3)  # task head: trained in full
    saved.save_pretrained(tmp_path)
    lm.disable_adapter_layers()
    torch.manual_seed(3)
    lm.add_adapter("o", LoRDBAConfig(r=4, init="random", target_modules=["o_proj"]))
    lm.load_adapter(tmp_path, "v")
    for name in ("o", "v", ["default", "o", "v"]):
        lm.set_adapter(name)
        torch.testing.assert_close(lm(input_ids=IDS).logits, base, rtol=0, atol=0, msg=str(name))
    assert not lm.get_model_status().enabled
    lm.enable_adapter_layers()
    assert not torch.allclose(lm(input_ids=IDS).logits, base)


@pytest.mark.parametrize("extra", [{"bias": "all"}, {"modules_to_save": ["task:a"]}])
def test_a_tensor_trained_in_full_that_no_file_can_hold_is_refused_before_training(tmp_path, extra):
    """bias="all" or modules_to_save reaching a module whose path is outside the file format's rule (a
    ModuleDict key with a space or ':'): the adapter was added and trained, and only save_pretrained
    refused the extra tensor. It is refused when the adapter is added, leaving the model as it was."""
    from torch import nn

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norms = nn.ModuleDict({"ln 0": nn.LayerNorm(4)})
            self.heads = nn.ModuleDict({"task:a": nn.Linear(4, 2)})

        def forward(self, x):
            return self.heads["task:a"](self.norms["ln 0"](self.proj(x)))

    model = Model()
    with pytest.raises(TargetModulesError, match=r"(norms\.ln 0\.bias|heads\.task:a\.weight).*cannot be trained"):
        get_lordba_model(model, LoRDBAConfig(r=2, target_modules=["proj"], **extra))
    assert type(model.proj) is nn.Linear and type(model.heads["task:a"]) is nn.Linear
    lm = get_lordba_model(model, LoRDBAConfig(r=2, target_modules=["proj"], bias="lora_only"))
    lm.save_pretrained(tmp_path)  # what the file can hold still saves


def test_a_float64_models_trained_bias_and_head_are_saved_as_float32(tmp_path):
    """A float64 model trains an adapter with bias="lora_only" and modules_to_save, but save_pretrained
    refused its extra tensors ('torch.float64, expected a float tensor'): the file format holds float32
    at most. They are stored as float32, as the scales are, and load back into the float64 model."""
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).double()

    lm = get_lordba_model(
        model(), LoRDBAConfig(r=2, init="random", target_modules=["0"], bias="lora_only", modules_to_save=["1"])
    )
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.01)
    x = torch.randn(3, 4, dtype=torch.float64)
    lm(x).pow(2).mean().backward()
    opt.step()
    lm.eval()
    lm.save_pretrained(tmp_path)
    tensors, _ = load_weights(tmp_path)
    assert {tensors[k].dtype for k in ("extra:0.bias", "extra:1.weight", "extra:1.bias")} == {torch.float32}
    again = LoRDBAModel.from_pretrained(model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), lm(x), rtol=0, atol=1e-5)
        assert not torch.equal(again(x), model()(x))  # the trained head and bias are in effect


@pytest.mark.parametrize("config", [{"target_modules": ["q_proj", "lm_head"]}, {"modules_to_save": ["lm_head"]}])
def test_resizing_the_vocabulary_under_an_adapted_or_saved_head_is_refused(config):
    """transformers' resize_token_embeddings put a new plain nn.Linear in place of an adapted (untied) output
    head, or of its copy trained in full: the head's adapter was dropped silently. It is refused; an adapter
    elsewhere resizes as the base does."""
    from lordba import ShapeMismatchError

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, **config))
    head = lm.get_base_model().get_output_embeddings()
    with pytest.raises(ShapeMismatchError, match="resize_token_embeddings: the output head"):
        lm.resize_token_embeddings(120)
    assert lm.get_base_model().get_output_embeddings() is head
    other = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, target_modules=["q_proj"]))
    other.resize_token_embeddings(120)
    assert other.get_base_model().get_output_embeddings().out_features == 120


@pytest.mark.parametrize(
    ("adapters", "weights", "named"),
    [
        (["a", "b"], None, "weights"),
        (["a", "b"], 1.0, "weights"),
        (None, [1.0, 1.0], "adapters"),
        ("ab", [1.0], "adapters"),
    ],
)
def test_add_weighted_adapter_names_an_argument_that_is_not_a_list(adapters, weights, named):
    """``weights=None`` (PEFT's signature has no default; a caller leaving it out of a keyword call) raised a bare
    TypeError from ``len(None)``; each argument that is not a list is refused by name, the model unchanged."""
    lm = _two_adapters(shared_scales=True)
    with pytest.raises(ConfigError, match=f"{named} must be a list"):
        lm.add_weighted_adapter(adapters, weights, "c")
    assert "c" not in lm.peft_config
    lm.add_weighted_adapter(("a", "b"), (w for w in (0.5, 0.5)), "c")  # tuples and iterables stay accepted
    assert "c" in lm.peft_config


@pytest.mark.parametrize(("name", "error"), [("a", AdapterStateError), ("x/y", ConfigError), (None, ConfigError)])
def test_add_weighted_adapter_checks_the_new_name_before_combining(name, error):
    """A name taken or invalid was found only when the combination was loaded: after the solver had re-factorised every
    module (its "re-factorised" warning given for an adapter never added), or, without lordba.convert imported, as
    "needs the converter's solver" instead of the name. It is refused first, naming it."""
    lm = _two_adapters(shared_scales=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no solve, so no re-factorisation warning
        with pytest.raises(error, match="already exists" if name == "a" else "adapter name"):
            lm.add_weighted_adapter(["a", "b"], [1.0, 1.0], name, combination_type="cat")
    assert sorted(lm.peft_config) == ["a", "b"]


def test_add_weighted_adapter_takes_numpy_and_tensor_weights_and_refuses_booleans():
    """Weights computed with NumPy (``np.float32``, ``np.int64``) or torch (a 0-d tensor) were refused as not finite
    numbers, and ``True`` was taken as the weight 1: the former are weights like floats, booleans are refused."""
    import numpy as np

    lm = _two_adapters(shared_scales=True)
    expected = {p: 0.5 * a.delta_weight() - 2.0 * lm.adapter_modules("b")[p].delta_weight()
                for p, a in lm.adapter_modules("a").items()}  # fmt: skip
    for i, weights in enumerate(([np.float32(0.5), np.int64(-2)], [torch.tensor(0.5), torch.tensor(-2.0)])):
        lm.add_weighted_adapter(["a", "b"], weights, f"c{i}")
        for path, c in lm.adapter_modules(f"c{i}").items():
            torch.testing.assert_close(c.delta_weight(), expected[path], rtol=1e-5, atol=1e-5)
    for weights in ([True, 1.0], [np.bool_(True), 1.0], [torch.tensor(True), 1.0], [torch.tensor([0.5]), 1.0]):
        with pytest.raises(ConfigError, match="weights must be finite numbers"):
            lm.add_weighted_adapter(["a", "b"], weights, "d")
    assert "d" not in lm.peft_config


def test_a_module_to_save_without_parameters_is_refused():
    """A quantized layer (the q4 base's 4-bit head) holds buffers, no parameters: ``modules_to_save=["lm_head"]``
    made a copy with nothing to train, so the head stayed as it was and no adapter file held it, silently. It is
    refused, naming the module and its type, before the model changes."""
    base = quantize_model(tiny_llama(0), backend="q4", group_size=64)
    with pytest.raises(TargetModulesError, match=r"'lm_head' \(Q4Linear\).*no parameters"):
        get_lordba_model(base, LoRDBAConfig(r=2, modules_to_save=["lm_head"]))
    assert type(base.lm_head).__name__ == "Q4Linear"
    get_lordba_model(base, LoRDBAConfig(r=2, modules_to_save=["norm"]))  # a float module of the same base trains


def test_parameter_counts_take_a_quantized_base_at_its_full_size():
    """``get_nb_trainable_parameters`` counts a quantized base's layers as the parameters they stand for (PEFT counts
    a bnb 4-bit weight at its full size): the q4 base holds its weights as buffers, so "all params" left them out
    (9,856 instead of 35,976 here) and ``print_trainable_parameters`` gave 57% trainable instead of 15.6%."""
    plain = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4))
    quantized = get_lordba_model(quantize_model(tiny_llama()), LoRDBAConfig(r=4))
    want = sum(p.numel() for p in tiny_llama().parameters()) + plain.get_nb_trainable_parameters()[0]
    assert plain.get_nb_trainable_parameters()[1] == want
    assert quantized.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()


def test_a_combination_keeps_each_modules_rank_where_one_path_ends_another():
    """``blocks.0.proj`` and ``inner.blocks.0.proj`` at different combined ranks: the combination's rank_pattern
    named its odd one out with a bare escaped path, which (keys match the end of a name, as in PEFT) also matched
    the other module, so the config said the wrong rank for it."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])
            self.inner = nn.Module()
            self.inner.blocks = nn.ModuleList([Block()])
            self.tail = Block()

        def forward(self, x):
            return self.tail.proj(self.inner.blocks[0].proj(self.blocks[0].proj(x)))

    torch.manual_seed(0)
    lm = get_lordba_model(Net(), LoRDBAConfig(r=2, target_modules=["proj"], rank_pattern={"^blocks\\.0\\.proj": 6}))
    lm.add_adapter("b", LoRDBAConfig(r=2, target_modules=["proj"]))
    lm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "c", combination_type="cat")
    held = {p: a.r for p, a in lm.adapter_modules("c").items()}
    assert held == {"blocks.0.proj": 8, "inner.blocks.0.proj": 4, "tail.proj": 4}
    assert {p: lm.peft_config["c"].rank_for(p) for p in held} == held


def test_two_adapters_training_the_same_module_in_full_cannot_be_active_together():
    """Stacking two adapters that each have a copy of ``score`` (modules_to_save) ran the first one's copy and
    left the second's out without a word; PEFT refuses it, and so does set_adapter now (nothing changes)."""
    lm = get_lordba_model(seq_cls(), LoRDBAConfig(r=4, init="random", modules_to_save=["score"]))
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random", modules_to_save=["score"]))
    with pytest.raises(AdapterStateError, match="each train 'score' in full"):
        lm.set_adapter(["default", "b"])
    assert lm.active_adapters == ["default"]
    lm.add_adapter("c", LoRDBAConfig(r=4, init="random"))  # no copy of its own: stacks
    lm.set_adapter(["default", "c"])
    assert lm.active_adapters == ["default", "c"]


def test_saving_an_fsdp2_sharded_adapter_is_refused_naming_the_tensor_and_the_recipe(tmp_path):
    """``save_pretrained`` of a model sharded by FSDP2 (``fully_shard``: its parameters are DTensors) failed in the
    sign packing with "aten.mul.Tensor got mixed torch.Tensor and DTensor" and wrote nothing; now an
    ``AdapterStateError`` names the sharded tensor and how to save (gather the full state dict, docs/training.md)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, target_modules=["q_proj"]))
        fully_shard(lm, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(AdapterStateError, match=r"q_proj\.\w+ is sharded .*full_state_dict=True"):
            lm.save_pretrained(tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()
    finally:
        dist.destroy_process_group()


def test_set_trainable_freezes_and_unfreezes_the_adapters_modules_trained_in_full():
    """``set_trainable(name, signs=False, scales=False)`` (docs/training.md's advice for an inactive adapter under
    DDP) left the adapter's copy of a ``modules_to_save`` module trainable: DDP without ``find_unused_parameters``
    then failed on the second step ("Expected to have finished reduction in the prior iteration"), and ``ptq``'s
    adapter kept a trainable head. Its modules trained in full now train with its scales, as its biases do."""
    config = LoRDBAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    lm = get_lordba_model(tiny_llama(0), config)
    lm.add_adapter("b", config)

    def trainable(name):
        return sorted(n for n, p in lm.named_parameters() if p.requires_grad and f".{name}." in n)

    assert "base_model.lm_head.lordba_saved.b.weight" in trainable("b")
    lm.set_trainable("b", signs=False, scales=False)
    assert trainable("b") == [] and "base_model.lm_head.lordba_saved.default.weight" in trainable("default")
    lm.set_trainable("b", signs=False, scales=True)
    assert "base_model.lm_head.lordba_saved.b.weight" in trainable("b")
    assert not any("latent" in n for n in trainable("b"))


def test_pack_freezes_the_adapters_modules_trained_in_full_and_trained_biases():
    """``pack()`` froze the adapter's own tensors but left its ``modules_to_save`` copies and the trained biases of
    layers it does not adapt trainable (6 tensors on this model): an optimizer built from ``requires_grad`` then
    kept training the head of an adapter in inference form, and DDP waited for their gradients."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True))
    config = LoRDBAConfig(r=2, target_modules=["q_proj", "v_proj"], bias="all", modules_to_save=["lm_head"])
    lm = get_lordba_model(base, config)
    lm.add_adapter("b", LoRDBAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    lm.pack("b")
    trained = sorted(n for n, p in lm.named_parameters() if p.requires_grad)
    assert "base_model.lm_head.lordba_saved.default.weight" in trained and not any(".b." in n for n in trained)
    assert any(n.endswith("o_proj.lordba_saved.default.bias") for n in trained)
    lm.pack()
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == []


def test_a_ctrl_c_anywhere_in_an_adapter_load_leaves_no_name_noted_as_being_added():
    """Ctrl-C at each point where Python handles it in a load (``_load_state``) of an adapter with a module trained in
    full, its traceback kept (a notebook keeps the last one): an adapter added later under that name and deleted leaves
    no trained copy of the head behind (was: one just after the name was noted as being added, before the ``try`` that
    forgets it, kept it noted for good: delete_adapter kept that adapter's trained copy)."""
    from torch import nn

    from _interrupts import ctrl_c_at_each_check
    from lordba.nn import model_peft

    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, modules_to_save=["lm_head"]))
    state = lm.adapter_state("default")
    files = {model_peft.__file__, nn.modules.module.__file__}
    for attempt in ctrl_c_at_each_check(files, functions={"_load_state", "__setattr__"}):
        with attempt:
            lm.load_adapter_state(state, "other")
            attempt.reached()
        if "other" in lm.peft_config:
            lm.delete_adapter("other")
        lm.add_adapter("other", LoRDBAConfig(r=2, modules_to_save=["lm_head"]))
        lm.delete_adapter("other")
        assert list(lm.base_model.lm_head.lordba_saved) == ["default"], attempt.n  # (attempt.error, its traceback)


@pytest.mark.parametrize("call", ["load", "add", "delete"])
def test_a_ctrl_c_anywhere_in_an_adapter_load_add_or_delete_leaves_it_whole_or_gone(call):
    """Ctrl-C at each point where Python handles it in a load, add or delete of an adapter with trained biases and a
    head trained in full: the adapter is whole (its layers, biases, head, outputs) or gone (no layer, copy or name
    left, the other adapter's outputs as before). Was: its name kept without its biases and head (a load or add cut
    after the layers were installed), layers holding an adapter the model did not name, or a deleted adapter's head
    kept (a later adapter of that name ran with it)."""
    from transformers import LlamaForCausalLM

    from _interrupts import ctrl_c_at_each_check
    from lordba.nn import model as model_module
    from lordba.nn import model_load, model_peft
    from lordba.nn.saved import SavedModule

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True)).eval()

    config = LoRDBAConfig(r=2, init="random", target_modules=["v_proj"], bias="lora_only", modules_to_save=["lm_head"])
    source = get_lordba_model(base(), config)
    with torch.no_grad():
        for adapter in source.adapter_modules("default").values():
            adapter.scale_out.mul_(50)
            adapter.bias_delta.normal_()
        source.base_model.lm_head.lordba_saved["default"].weight.mul_(2)
    state = source.adapter_state("default")
    lm = get_lordba_model(base(), LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    outputs = lambda name: lm(input_ids=IDS, adapter_names=[name] * 2).logits.detach()  # noqa: E731
    plain, mine = outputs("default"), None
    files = {model_module.__file__, model_load.__file__, model_peft.__file__}
    names = {"load_adapter_state", "_load_state", "add_adapter", "delete_adapter", "_add_whole", "_drop_whole"}
    for attempt in ctrl_c_at_each_check(files, functions=names | {"_install", "_load_extras", "_install_extras"}):
        if call == "delete":
            lm.load_adapter_state(state, "other")
        with attempt:
            if call == "add":
                lm.add_adapter("other", config)
            else:
                (lm.delete_adapter("other") if call == "delete" else lm.load_adapter_state(state, "other"))
            attempt.reached()
        attempt.error = None
        held = [p for p, layer in lm._lordba_layers() if "other" in layer.lordba_adapters]
        copies = [p for p, m in lm._saved_modules() if "other" in m.lordba_saved]
        if "other" in lm.peft_config:
            assert held == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"], attempt.n
            assert copies == ["lm_head"], attempt.n
            assert all(a.bias_delta is not None for a in lm.adapter_modules("other").values()), attempt.n
            if call != "add":
                mine = outputs("other") if mine is None else mine
                assert torch.equal(outputs("other"), mine), attempt.n
                assert sorted(lm.adapter_state("other").extras) == sorted(state.extras), attempt.n
            lm.delete_adapter("other")
        else:
            assert held == [] and copies == [] and "other" not in lm.active_adapters, attempt.n
            assert not any(isinstance(m, SavedModule) for m in lm.base_model.modules()), attempt.n
        assert torch.equal(outputs("default"), plain), attempt.n
