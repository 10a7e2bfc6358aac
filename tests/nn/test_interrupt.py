"""Ctrl-C (``KeyboardInterrupt``) inside a long call of a model: the model's flags still describe the weights that
are there (merged adapters, active adapters, the layers' types), and the call repeated finishes what it began."""

import warnings

import pytest
import torch

from _interrupts import interrupt, interrupt_after
from lordba import LoRDBAConfig, get_lordba_model
from lordba.nn import layer as layer_module
from lordba.nn.layer import LoRDBALinear
from lordba.quant import quantize_model

from conftest import tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(base, names=("default",)):
    """A LoRDBA model of ``base`` with a visible random adapter per name (the first one active)."""
    torch.manual_seed(3)
    lm = get_lordba_model(base, LoRDBAConfig(r=4, init="random"), names[0])
    for name in names[1:]:
        lm.add_adapter(name, LoRDBAConfig(r=4, init="random"))
    for name in names:
        for adapter in lm.adapter_modules(name).values():
            with torch.no_grad():
                adapter.scale_out.mul_(50)
    return lm


def weights(lm):
    return {path: layer.base_layer.weight.detach().clone() for path, layer in lm._lordba_layers()}


def check_flags(lm, base, delta):
    """Each layer's weight is its base weight plus the update of the adapters it names as merged."""
    for path, layer in lm._lordba_layers():
        want = base[path] + (delta[path] if layer.merged_adapters else 0)
        torch.testing.assert_close(layer.base_layer.weight, want, rtol=0, atol=1e-5, msg=path)


@pytest.mark.parametrize("k", [1, 7, 14])
def test_an_unmerge_interrupted_at_a_layer_leaves_its_flags_true_and_a_second_unmerge_restores_the_base(monkeypatch, k):
    # The layer dropped the adapter's name before computing its update: a Ctrl-C there left the update in the
    # weight of a layer that said "not merged", and unmerge_adapter() then never took it out (0.10 in the logits).
    lm = adapted(tiny_llama(0))
    base = weights(lm)
    delta = {path: layer.get_delta_weight("default") for path, layer in lm._lordba_layers()}
    lm.merge_adapter()
    interrupt(monkeypatch, LoRDBALinear, "get_delta_weight", k)
    with pytest.raises(KeyboardInterrupt):
        lm.unmerge_adapter()
    monkeypatch.undo()
    assert sum(bool(layer.merged_adapters) for _, layer in lm._lordba_layers()) == 15 - k
    check_flags(lm, base, delta)
    lm.unmerge_adapter()
    check_flags(lm, base, delta)


def test_a_merge_whose_undoing_is_interrupted_too_leaves_the_flags_true(monkeypatch):
    # Ctrl-C at layer 7 of 14, and again (a second Ctrl-C) while the merge took layers 6.. out again.
    lm = adapted(tiny_llama(0))
    base = weights(lm)
    delta = {path: layer.get_delta_weight("default") for path, layer in lm._lordba_layers()}
    interrupt(monkeypatch, LoRDBALinear, "get_delta_weight", 7, 10)
    with pytest.raises(KeyboardInterrupt):
        lm.merge_adapter()
    monkeypatch.undo()
    assert sum(bool(layer.merged_adapters) for _, layer in lm._lordba_layers()) == 4
    check_flags(lm, base, delta)
    lm.unmerge_adapter()
    check_flags(lm, base, delta)


def test_a_merge_interrupted_after_a_weight_took_its_update_takes_it_out(monkeypatch):
    # Ctrl-C delivered just after the weight's update was added (here as the bias step begins): the layer did not
    # record the merge yet, so the merge's undoing skipped it and the update stayed in a layer saying "not merged".
    lm = adapted(tiny_llama(0))
    base = weights(lm)
    interrupt(monkeypatch, LoRDBALinear, "_merge_bias", 5)
    with pytest.raises(KeyboardInterrupt):
        lm.merge_adapter()
    monkeypatch.undo()
    assert not any(layer.merged_adapters for _, layer in lm._lordba_layers())
    check_flags(lm, base, {})


def test_a_q4_unmerge_interrupted_keeps_the_original_base_and_a_second_one_restores_it_bit_for_bit(
    monkeypatch, input_ids
):
    # The layer popped the original base before putting it back: a Ctrl-C between lost it (the next unmerge
    # raised IndexError, and the layer kept the requantized weight for good).
    lm = adapted(quantize_model(tiny_llama(0), backend="q4", group_size=32))
    want = logits(lm, input_ids)
    with lm.disable_adapter():
        base = logits(lm, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.merge_adapter()
    interrupt(monkeypatch, layer_module, "touch", 1)  # the base layer being put back
    with pytest.raises(KeyboardInterrupt):
        lm.unmerge_adapter()
    monkeypatch.undo()
    lm.unmerge_adapter()
    assert not any(layer.merged_adapters for _, layer in lm._lordba_layers())
    assert torch.equal(logits(lm, input_ids), want)
    with lm.disable_adapter():
        assert torch.equal(logits(lm, input_ids), base)


def layer_count(lm):
    return sum(isinstance(m, LoRDBALinear) for m in lm.base_model.modules())


@pytest.mark.parametrize("k", [1, 7, 14])
def test_an_unload_interrupted_while_unmerging_keeps_every_adapter_layer_and_can_be_repeated(monkeypatch, input_ids, k):
    # unload() unmerged and took out one layer after another: a Ctrl-C in the unmerge of layer k left layers
    # 1..k-1 plain while the model still named its adapter as active (the logits neither the adapter's nor the
    # base's: 0.69 off the adapter's).
    lm = adapted(tiny_llama(0))
    want = logits(lm, input_ids)
    lm.merge_adapter()
    interrupt(monkeypatch, LoRDBALinear, "get_delta_weight", k)
    with pytest.raises(KeyboardInterrupt):
        lm.unload()
    monkeypatch.undo()
    assert layer_count(lm) == 14 and lm.active_adapters == ["default"]
    torch.testing.assert_close(logits(lm, input_ids), want, rtol=1e-4, atol=1e-4)
    base = lm.unload()
    assert layer_count(base) == 0
    torch.testing.assert_close(logits(base, input_ids), logits(tiny_llama(0), input_ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("call", ["unload", "merge_and_unload"])
@pytest.mark.parametrize("k", [1, 7, 14, 15])
def test_unload_and_merge_and_unload_interrupted_while_taking_layers_out_take_none_out(monkeypatch, input_ids, call, k):
    # Interrupted at the k-th layer taken out (15: the modules trained in full, after every layer), the model keeps
    # every adapter layer and its modules trained in full (trainable as before), and the call repeated finishes.
    from lordba.nn import model_merge
    from lordba.nn.model import LoRDBAModel

    torch.manual_seed(3)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random", modules_to_save=["lm_head"]))
    for adapter in lm.adapter_modules("default").values():
        with torch.no_grad():
            adapter.scale_out.mul_(50)
    with torch.no_grad():
        next(m for _, m in lm._saved_modules()).lordba_saved["default"].weight.mul_(1.5)
    want, trainable = logits(lm, input_ids), lm.get_nb_trainable_parameters()
    if k == 15:
        interrupt(monkeypatch, LoRDBAModel, "_unwrap_saved", 1)
    else:
        interrupt(monkeypatch, model_merge, "replace_everywhere", k)
    with pytest.raises(KeyboardInterrupt):
        getattr(lm, call)()
    monkeypatch.undo()
    assert layer_count(lm) == 14 and len(lm._saved_modules()) == 1 and lm.active_adapters == ["default"]
    assert lm.get_nb_trainable_parameters() == trainable
    torch.testing.assert_close(logits(lm, input_ids), want, rtol=1e-4, atol=1e-4)
    base = getattr(lm, call)()
    assert layer_count(base) == 0 and not lm._saved_modules()
    if call == "merge_and_unload":
        torch.testing.assert_close(logits(base, input_ids), want, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(logits(base, input_ids), logits(tiny_llama(0), input_ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 7, 14])
def test_a_set_adapter_interrupted_while_unmerging_keeps_the_active_adapter_everywhere(monkeypatch, input_ids, k):
    # set_adapter unmerged and switched one layer after another: a Ctrl-C in layer k's unmerge left layers
    # 1..k-1 running the new adapter while the model said the old one was active (logits 0.58 off both).
    lm = adapted(tiny_llama(0), ("a", "b"))
    lm.set_adapter("b")
    want_b = logits(lm, input_ids)
    lm.set_adapter("a")
    want_a = logits(lm, input_ids)
    lm.merge_adapter()
    interrupt(monkeypatch, LoRDBALinear, "get_delta_weight", k)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.set_adapter("b")
    monkeypatch.undo()
    assert lm.active_adapters == ["a"]
    assert all(layer.active_adapters == ["a"] for _, layer in lm._lordba_layers())
    torch.testing.assert_close(logits(lm, input_ids), want_a, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.set_adapter("b")
    torch.testing.assert_close(logits(lm, input_ids), want_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 7, 14])
def test_from_pretrained_and_load_adapter_interrupted_while_installing_leave_no_part_of_the_adapter(
    monkeypatch, tmp_path, input_ids, k
):
    # The layers were wrapped and given the adapter one by one: a Ctrl-C at layer k left layers 1..k-1 holding an
    # adapter the model did not name (saved and activated with a later adapter of that name), and from_pretrained
    # repeated on the same model refused it ("already has LoRDBA layers").
    from lordba.nn.model import LoRDBAModel

    lm = adapted(tiny_llama(0), ("default", "b"))
    lm.save_pretrained(tmp_path)
    want = logits(lm, input_ids)
    base = tiny_llama(0)
    interrupt(monkeypatch, LoRDBALinear, "add_adapter", k)
    with pytest.raises(KeyboardInterrupt):
        LoRDBAModel.from_pretrained(base, tmp_path)
    monkeypatch.undo()
    assert layer_count(base) == 0
    loaded = LoRDBAModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), want, rtol=1e-5, atol=1e-5)
    interrupt(monkeypatch, LoRDBALinear, "add_adapter", k)
    with pytest.raises(KeyboardInterrupt):
        loaded.load_adapter(tmp_path / "b", "b")
    monkeypatch.undo()
    assert layer_count(loaded) == 14
    assert all(list(layer.lordba_adapters) == ["default"] for _, layer in loaded._lordba_layers())
    loaded.load_adapter(tmp_path / "b", "b")
    assert loaded.adapter_state("b").modules.keys() == lm.adapter_state("b").modules.keys()


@pytest.mark.parametrize("where", ["as the load returned", "in the eval's first call", "in the eval's 20th call"])
def test_a_load_adapter_interrupted_after_the_load_still_puts_the_model_in_eval_mode(monkeypatch, tmp_path, where):
    """``load_adapter`` for inference puts the model in eval mode once the adapter is in, as PEFT's does: a Ctrl-C as
    the load returned, or part way through the eval, left the model, the adapter loaded, in train mode (or its
    modules after the cut: dropout on in the inference that follows)."""
    from lordba.nn.model import LoRDBAModel

    lm = adapted(tiny_llama(0), ("default", "b"))
    lm.save_pretrained(tmp_path)
    loaded = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path).train()
    if where == "as the load returned":
        interrupt_after(monkeypatch, LoRDBAModel, "_load_state", 1)
    else:
        interrupt(monkeypatch, torch.nn.Module, "train", 1 if "first" in where else 20)
    with pytest.raises(KeyboardInterrupt):
        loaded.load_adapter(tmp_path / "b", "b")
    monkeypatch.undo()
    assert "b" in loaded.peft_config
    assert not any(module.training for module in loaded.modules())


@pytest.mark.parametrize("k", [1, 7, 14])
def test_a_delete_adapter_interrupted_keeps_the_adapter_in_every_layer_and_can_be_repeated(monkeypatch, input_ids, k):
    """Ctrl-C at the k-th layer of ``delete_adapter``: every layer still holds the adapter the model names (before:
    the first layers had lost it while it stayed configured and active, logits 0.6 off), and repeating the call
    deletes it: the model then runs as the base."""
    base = tiny_llama()
    want_base = logits(base, input_ids)
    lm = adapted(base, ("a", "b"))
    want = logits(lm, input_ids)
    interrupt(monkeypatch, LoRDBALinear, "delete_adapter", k)
    with pytest.raises(KeyboardInterrupt):
        lm.delete_adapter("a")
    monkeypatch.undo()
    assert "a" in lm.peft_config and lm.active_adapters == ["a"]
    assert all(list(layer.lordba_adapters) == ["a", "b"] for _, layer in lm._lordba_layers()) and layer_count(lm) == 14
    torch.testing.assert_close(logits(lm, input_ids), want, rtol=0, atol=0)
    lm.delete_adapter("a")
    lm.delete_adapter("b")
    assert layer_count(lm) == 0
    torch.testing.assert_close(logits(lm, input_ids), want_base, rtol=0, atol=0)
