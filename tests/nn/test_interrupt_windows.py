"""Ctrl-C (``KeyboardInterrupt``) delivered in the few steps between a change and its record: just after a weight
took (or lost) an adapter's update in place, just after a layer merged, just after a bias was taken off its list.
Python raises it at the next bytecode that checks for signals, which is right after the long tensor operation."""

import pytest
import torch
from test_interrupt import adapted, check_flags, weights
from torch import nn

from _interrupts import interrupt_after
from lordba import LoRDBAConfig, get_lordba_model
from lordba.nn.layer import LoRDBALinear
from lordba.quant.backend import PlainLinear

from conftest import tiny_llama


@pytest.mark.parametrize("k", [1, 7, 14])
def test_a_merge_interrupted_just_after_a_weight_took_its_update_takes_it_out(monkeypatch, k):
    # The layer recorded the merge after the in-place add returned: a Ctrl-C between left the update in the weight
    # of a layer saying "not merged" (no unmerge ever took it out).
    lm = adapted(tiny_llama(0))
    base = weights(lm)
    interrupt_after(monkeypatch, PlainLinear, "merge", k)
    with pytest.raises(KeyboardInterrupt):
        lm.merge_adapter()
    monkeypatch.undo()
    assert not any(layer.merged_adapters for _, layer in lm._lordba_layers())
    check_flags(lm, base, {})


@pytest.mark.parametrize("k", [1, 7, 14])
def test_an_unmerge_interrupted_just_after_a_weight_lost_its_update_records_it_and_a_second_unmerge_is_exact(
    monkeypatch, k
):
    # The layer dropped the adapter's name after the in-place subtraction returned: a Ctrl-C between left a layer
    # saying "merged" over its base weight, and the next unmerge subtracted the update a second time.
    lm = adapted(tiny_llama(0))
    base = weights(lm)
    delta = {path: layer.get_delta_weight("default") for path, layer in lm._lordba_layers()}
    lm.merge_adapter()
    interrupt_after(monkeypatch, PlainLinear, "unmerge", k)
    with pytest.raises(KeyboardInterrupt):
        lm.unmerge_adapter()
    monkeypatch.undo()
    assert sum(bool(layer.merged_adapters) for _, layer in lm._lordba_layers()) == 14 - k
    check_flags(lm, base, delta)
    lm.unmerge_adapter()
    check_flags(lm, base, delta)


@pytest.mark.parametrize("k", [1, 7, 14])
def test_a_merge_interrupted_just_after_a_layer_merged_leaves_no_layer_merged(monkeypatch, k):
    # merge_layers noted a layer as merged (to undo it) after its merge returned: a Ctrl-C between left that layer
    # merged and the others not (a half-merged model the merge call said it never leaves).
    lm = adapted(tiny_llama(0))
    base = weights(lm)
    interrupt_after(monkeypatch, LoRDBALinear, "merge", k)
    with pytest.raises(KeyboardInterrupt):
        lm.merge_adapter()
    monkeypatch.undo()
    assert not any(layer.merged_adapters for _, layer in lm._lordba_layers())
    check_flags(lm, base, {})


def test_an_unmerge_interrupted_while_putting_the_bias_back_keeps_it_and_a_second_unmerge_restores_it(monkeypatch):
    # The layer popped the bias from before the merge, then set it: a Ctrl-C as the setting began (nn.Module's
    # __setattr__, Python code) lost it, and the merged bias (base + trained change) stayed for good.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    lm = get_lordba_model(model, LoRDBAConfig(r=2, init="random", target_modules=["0"], bias="lora_only"))
    layer = lm.base_model[0]
    with torch.no_grad():
        layer.lordba_adapters["default"].bias_delta.normal_()
    bias = layer.base_layer.bias.detach().clone()
    lm.merge_adapter()
    assert not torch.equal(layer.base_layer.bias, bias)
    original, count = nn.Linear.__setattr__, [0]

    def setattr_interrupted(self, name, value):
        if name == "bias":
            count[0] += 1
            if count[0] == 1:
                raise KeyboardInterrupt
        original(self, name, value)

    monkeypatch.setattr(nn.Linear, "__setattr__", setattr_interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.unmerge_adapter()
    monkeypatch.undo()
    lm.unmerge_adapter()
    assert not layer.merged_adapters and torch.equal(layer.base_layer.bias, bias)


@pytest.mark.parametrize("call", ["merge", "unmerge"])
def test_a_merge_or_unmerge_of_inference_tensors_interrupted_as_a_weight_changed_records_it(monkeypatch, call):
    # A model made under torch.inference_mode() has weights with no version counter, which told the layer whether the
    # in-place update was done: a Ctrl-C as layer 7's add returned left its update in a layer saying "not merged"
    # (33.8 off in its weight); one as its subtraction returned kept the name, and the next unmerge subtracted twice.
    with torch.inference_mode():
        lm = adapted(tiny_llama(0))
        assert torch.is_inference(lm.base_model.model.layers[0].self_attn.q_proj.base_layer.weight)
        base = weights(lm)
        delta = {path: layer.get_delta_weight("default") for path, layer in lm._lordba_layers()}
        if call == "unmerge":
            lm.merge_adapter()
        interrupt_after(monkeypatch, PlainLinear, call, 7)
        with pytest.raises(KeyboardInterrupt):
            getattr(lm, f"{call}_adapter")()
        monkeypatch.undo()
        assert sum(bool(layer.merged_adapters) for _, layer in lm._lordba_layers()) == (0 if call == "merge" else 7)
        check_flags(lm, base, delta)
        lm.unmerge_adapter()
        check_flags(lm, base, delta)
        assert not any(layer.merged_adapters for _, layer in lm._lordba_layers())
