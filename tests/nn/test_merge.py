"""Merging: a quantized base is requantized (a warning names the error), ``safe_merge`` refuses
non-finite weights and leaves nothing half-merged."""

import warnings

import pytest
import torch
from torch import nn

from lordba import AdapterStateError, ConfigError, LoRDBAConfig, get_lordba_model
from lordba.nn.merge import MergeRequantizationWarning
from lordba.quant import quantize_model

from conftest import tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(model):
    torch.manual_seed(3)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random"))
    for adapter in lm.adapter_modules("default").values():  # a visible update
        with torch.no_grad():
            adapter.scale_out.mul_(50)
    return lm


def test_merging_into_a_quantized_base_warns_with_the_error_and_unmerge_is_exact(input_ids):
    lm = adapted(quantize_model(tiny_llama(0), backend="hqq", bits=4, group_size=8))
    unmerged = logits(lm, input_ids)
    with pytest.warns(MergeRequantizationWarning, match=r"requantized 14 layer\(s\).*largest weight error") as seen:
        lm.merge_adapter()
    error = float(str(seen[0].message).split("update is ")[1].split(",")[0])
    assert error > 0
    merged = logits(lm, input_ids)
    assert not torch.allclose(merged, unmerged, atol=1e-4)  # the requantization moved the outputs
    lm.unmerge_adapter()
    assert torch.equal(logits(lm, input_ids), unmerged)


def test_the_merge_warning_reports_the_largest_error_of_all_layers():
    """The warning's number is the maximum over the layers of |requantized merged weight - (base + ΔW)|, not the
    error of the layer merged last."""
    lm = adapted(quantize_model(tiny_llama(0), backend="hqq", bits=4, group_size=8))
    layers = dict(lm._lordba_layers())
    with torch.no_grad():
        want = {
            p: layer.backend.dequantize(layer.base_layer) + layer.get_delta_weight("default")
            for p, layer in layers.items()
        }
    with pytest.warns(MergeRequantizationWarning) as seen:
        lm.merge_adapter()
    reported = float(str(seen[0].message).split("update is ")[1].split(",")[0])
    with torch.no_grad():
        errors = [
            float((layer.backend.dequantize(layer.base_layer) - want[p]).abs().max()) for p, layer in layers.items()
        ]
    assert errors[-1] < max(errors)  # the last layer merged is not the worst one
    assert reported == pytest.approx(max(errors), rel=1e-3)


def test_merging_into_an_unquantized_base_is_silent(input_ids):
    lm = adapted(tiny_llama(0))
    unmerged = logits(lm, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeRequantizationWarning)
        lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_safe_merge_refuses_non_finite_weights_and_merges_nothing(input_ids, quantized):
    base = quantize_model(tiny_llama(0), backend="hqq", bits=4, group_size=8) if quantized else tiny_llama(0)
    lm = adapted(base)
    broken = lm.adapter_modules("default")["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        broken.scale_out[0] = float("inf")
    before = {n: p.clone() for n, p in lm.base_model.named_parameters() if "lordba" not in n}
    with pytest.raises(AdapterStateError, match=r"safe_merge.*'default'.*model.layers.1.mlp.down_proj.*NaN/Inf"):
        lm.merge_adapter(safe_merge=True)
    assert not any(layer.merged for _, layer in lm._lordba_layers())
    for n, p in lm.base_model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    with pytest.raises(AdapterStateError, match="safe_merge"):
        lm.merge_and_unload(safe_merge=True)
    assert lm.peft_config  # still wrapped and adapted


def test_merge_and_unload_takes_peft_keyword_arguments(input_ids):
    lm = adapted(tiny_llama(0))
    want = logits(lm, input_ids)
    base = lm.merge_and_unload(progressbar=True, safe_merge=True)
    torch.testing.assert_close(logits(base, input_ids), want, rtol=1e-4, atol=1e-4)


def test_merge_names_an_unknown_adapter_and_takes_one_name_as_a_string(input_ids):
    # A typo used to merge nothing, silently: merge_and_unload then returned the bare base.
    lm = adapted(tiny_llama(0))
    want = logits(lm, input_ids)
    with pytest.raises(AdapterStateError, match="unknown adapter 'defualt'"):
        lm.merge_adapter(["defualt"])
    with pytest.raises(AdapterStateError, match="unknown adapter 'defualt'"):
        lm.merge_and_unload(adapter_names=["defualt"])
    assert lm.peft_config and not any(layer.merged for _, layer in lm._lordba_layers())  # unchanged
    lm.merge_adapter("default")  # one name (was read as the names 'd', 'e', ...: nothing merged)
    assert all(layer.merged_adapters == ["default"] for _, layer in lm._lordba_layers())
    torch.testing.assert_close(logits(lm, input_ids), want, rtol=1e-4, atol=1e-4)
    lm.unmerge_adapter()
    torch.testing.assert_close(
        logits(lm.merge_and_unload(adapter_names="default"), input_ids), want, rtol=1e-4, atol=1e-4
    )


def _scales(lm, name, path, value=3e4):
    """Set adapter ``name``'s scales at ``path`` to ``value`` (3e4: a finite update in float32, too large for
    the q4 base's float16 group scales once requantized)."""
    adapter = lm.adapter_modules(name)[path]
    with torch.no_grad():
        for scale in (adapter.scale_in, adapter.scale_mid, adapter.scale_out):
            scale.fill_(value)


def _bases(lm):
    return {p: (layer.base_layer, list(layer.merged_adapters)) for p, layer in lm._lordba_layers()}


def test_a_safe_merge_refused_after_requantizing_leaves_every_layer_as_it_was(input_ids):
    # The requantized weight overflowed (finite before requantizing) in a layer that had already taken the
    # first of two adapters: that layer kept it merged; and a refusal further down the model took out of the
    # layers already done every adapter merged before, by earlier calls, too.
    lm = adapted(quantize_model(tiny_llama(0), backend="q4", group_size=64))
    torch.manual_seed(4)
    lm.add_adapter("b", LoRDBAConfig(r=4, init="random"))
    _scales(lm, "b", "model.layers.0.self_attn.q_proj")
    lm.set_adapter(["default", "b"])
    before, want = _bases(lm), logits(lm, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergeRequantizationWarning)
        with pytest.raises(AdapterStateError, match=r"'b'.*layers.0.self_attn.q_proj.*(NaN|float16)"):
            lm.merge_adapter(safe_merge=True)
        assert _bases(lm) == before
        assert torch.equal(logits(lm, input_ids), want)

        lm.merge_adapter("default")  # an earlier call's merge stays as it is
        _scales(lm, "b", "model.layers.0.self_attn.q_proj", 0.1)
        _scales(lm, "b", "model.layers.1.mlp.down_proj")  # refused after layers 0.* took "b"
        merged, want = _bases(lm), logits(lm, input_ids)
        with pytest.raises(AdapterStateError, match=r"'b'.*layers.1.mlp.down_proj.*(NaN|float16)"):
            lm.merge_adapter("b", safe_merge=True)
        assert _bases(lm) == merged
        assert all(layer.merged_adapters == ["default"] for _, layer in lm._lordba_layers())
        assert torch.equal(logits(lm, input_ids), want)
    lm.unmerge_adapter()
    assert all(layer.base_layer is before[p][0] for p, layer in lm._lordba_layers())


def test_merging_into_layers_accelerate_offloads_is_refused_and_changes_nothing(tmp_path, input_ids):
    """A layer offloaded by accelerate (``device_map`` with ``offload_folder``) holds its weights on ``meta``; its
    hook loads them from the offload files for each call. Merging added the update to the meta tensor (a no-op),
    so merge_adapter / merge_and_unload returned a model without those layers' updates, silently (logits off by
    ~0.4). It is refused, naming the layer, before any layer changes."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "base")
    parts = ("model.embed_tokens", "model.layers.0", "model.norm", "model.rotary_emb", "lm_head")
    device_map = {**dict.fromkeys(parts, "cpu"), "model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map, offload_folder=tmp_path)
    lm = adapted(model.eval())
    want = logits(lm, input_ids)
    weight = lm.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    for merge in (lm.merge_adapter, lm.merge_and_unload):
        with pytest.raises(AdapterStateError, match=r"model\.layers\.1\.self_attn\.q_proj.*offloaded"):
            merge()
        assert not any(layer.merged for _, layer in lm._lordba_layers())
        assert torch.equal(lm.base_model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)
        assert torch.equal(logits(lm, input_ids), want)


def test_merging_into_an_output_head_tied_to_the_input_embeddings_is_refused_and_changes_nothing(input_ids):
    """With ``tie_word_embeddings`` (Qwen, Gemma, small Llamas) ``lm_head.weight`` *is* ``embed_tokens.weight``: merging
    an adapter of a targeted ``lm_head`` added its update in place to the input embeddings too, so the merged model
    (merge_adapter, merge_and_unload) computed something else than base + adapter, silently (logits off by ~700 here).
    It is refused, naming both modules, before any layer changes; the other layers of an untied model still merge."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": True})).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    torch.manual_seed(3)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random", target_modules=["q_proj", "lm_head"]))
    for adapter in lm.adapter_modules("default").values():
        with torch.no_grad():
            adapter.scale_out.mul_(50)
    want = logits(lm, input_ids)
    for merge in (lm.merge_adapter, lm.merge_and_unload):
        with pytest.raises(AdapterStateError, match=r"'lm_head'.*tied.*'model\.embed_tokens\.weight'"):
            merge()
        assert not any(layer.merged for _, layer in lm._lordba_layers())
        assert torch.equal(model.model.embed_tokens.weight, embeddings)
        assert torch.equal(logits(lm, input_ids), want)
    lm.delete_adapter("default")
    torch.manual_seed(3)
    lm.add_adapter("q", LoRDBAConfig(r=4, init="random", target_modules=["q_proj"]))
    lm.set_adapter("q")
    want = logits(lm, input_ids)
    assert torch.allclose(logits(lm.merge_and_unload(), input_ids), want, atol=1e-4)


def test_merge_refuses_an_adapter_named_twice_and_names_that_are_not_strings(input_ids):
    # merge_adapter(["default", "default"]) used to add the update into the base twice, silently.
    lm = adapted(tiny_llama(0))
    want = logits(lm, input_ids)
    for bad in (["default", "default"], 5, [None], [["default"]]):
        with pytest.raises(ConfigError, match="merge: "):
            lm.merge_adapter(bad)
        with pytest.raises(ConfigError, match="merge: "):
            lm.merge_and_unload(adapter_names=bad)
    assert lm.peft_config and not any(layer.merged for _, layer in lm._lordba_layers())  # unchanged
    torch.testing.assert_close(logits(lm, input_ids), want)


def test_merging_while_the_adapters_are_disabled_is_refused_at_merge_time(input_ids):
    """``merge_adapter()`` after ``disable_adapter_layers()`` (or inside a ``disable_adapter()`` block) merged, and
    the next forward failed with "unmerge before disabling them", a call the user never made; PEFT's forward unmerges
    silently. The merge is refused, naming the disabled adapters, nothing merged."""
    lm = adapted(tiny_llama())
    base = logits(tiny_llama(), input_ids)
    lm.disable_adapter_layers()
    with pytest.raises(AdapterStateError, match=r"merge_adapter: the adapters are disabled \(disable_adapter_layers"):
        lm.merge_adapter()
    assert not any(layer.merged for _, layer in lm._lordba_layers())
    torch.testing.assert_close(logits(lm, input_ids), base, rtol=0, atol=0)
    lm.enable_adapter_layers()
    adapted_out = logits(lm, input_ids)
    with lm.disable_adapter():
        with pytest.raises(AdapterStateError, match="in a disable_adapter"):
            lm.merge_adapter()
        torch.testing.assert_close(logits(lm, input_ids), base, rtol=0, atol=0)
    lm.merge_adapter()  # enabled again: merges
    torch.testing.assert_close(logits(lm, input_ids), adapted_out, rtol=1e-4, atol=1e-4)


def test_a_layer_of_a_block_shared_by_two_paths_merges(input_ids):
    """A block registered at two paths (one module: Zamba's shared transformer block) holds one LoRDBA layer, whose
    weight the other path reaches through that same layer: the merge was refused as 'tied to layers.1.q.base_layer.
    weight', another module's. It merges, outputs unchanged, and unmerges to the base; a weight truly tied to another
    module is still refused (test above)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            return self.q(x)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            block = Block()
            self.layers = nn.ModuleList([block, block])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model, x = Shared(), torch.randn(3, 8)
    base = model(x).detach()
    lm = get_lordba_model(model, LoRDBAConfig(r=2, init="random", target_modules=["q"]))
    with torch.no_grad():
        unmerged = lm(x)
        assert not torch.allclose(unmerged, base, atol=1e-3)
        lm.merge_adapter()
        torch.testing.assert_close(lm(x), unmerged, rtol=1e-5, atol=1e-5)
        lm.unmerge_adapter()
        torch.testing.assert_close(lm(x), unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm.unload()(x), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_merge_into_a_half_precision_weight_rounds_once(dtype):
    """The update is added to a float16 / bfloat16 weight in float32 and the sum rounded once: every merged weight is
    the float64 sum rounded to the weight's dtype. Was: the update was rounded to the weight's dtype first, then the
    sum again (bfloat16: 664 of 4096 weights off by one step, up to 0.00198 from the float64 sum against 0.00195)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(dtype)
    weight = model[0].weight.detach().clone()
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random", target_modules=["0"]))
    want = (weight.double() + model[0].get_delta_weight("default").double()).to(dtype)
    lm.merge_adapter()
    assert torch.equal(model[0].base_layer.weight.detach(), want)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_merge_whose_requantized_weight_is_not_finite_warns_naming_the_layer(input_ids, value):
    """Without ``safe_merge``, an adapter with a NaN / Inf scale merged into an HQQ base gave a model that computes NaN,
    and the warning read as an ordinary merge ("the largest weight error ... is 3.843"): the NaN error was dropped by
    ``max``. It names the layer whose requantized weight is not finite; the merge stays undoable."""
    lm = adapted(quantize_model(tiny_llama(0), backend="hqq", bits=4, group_size=8))
    with lm.disable_adapter():
        base = logits(lm, input_ids)
    with torch.no_grad():
        lm.adapter_modules("default")["model.layers.1.mlp.down_proj"].scale_out[0] = value
    with pytest.warns(MergeRequantizationWarning, match=r"not finite.*'model.layers.1.mlp.down_proj'.*computes NaN"):
        lm.merge_adapter()
    assert not torch.isfinite(logits(lm, input_ids)).all()
    lm.unmerge_adapter()
    with lm.disable_adapter():
        assert torch.equal(logits(lm, input_ids), base)


def test_an_empty_list_of_adapter_names_merges_nothing_as_in_peft(input_ids):
    """``merge_adapter([])`` / ``merge_and_unload(adapter_names=[])`` merge no adapter, as PEFT's
    ``check_adapters_to_merge`` does (before: the empty list meant the active adapters, so ``merge_and_unload``
    returned a base with the adapter in it where PEFT returns the bare base)."""
    want_base = logits(tiny_llama(0), input_ids)
    lm = adapted(tiny_llama(0))
    want = logits(lm, input_ids)
    lm.merge_adapter([])
    assert not any(layer.merged for _, layer in lm._lordba_layers())
    torch.testing.assert_close(logits(lm, input_ids), want, rtol=0, atol=0)
    base = lm.merge_and_unload(adapter_names=[])
    torch.testing.assert_close(logits(base, input_ids), want_base, rtol=0, atol=0)
