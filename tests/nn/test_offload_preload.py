"""Adapters and modules trained in full below a module whose accelerate hook loads every tensor of its subtree by
name (``dispatch_model(..., preload_module_classes=[...])`` with that module offloaded: the modules below it have no
hook of their own, and their tensors sit on ``meta``)."""

import pytest
import torch
from test_offload_bias import DEVICE_MAP  # the second decoder layer on disk

from lordba import LoRDBAConfig, get_lordba_model
from lordba.errors import TargetModulesError
from lordba.nn.model import LoRDBAModel

from conftest import tiny_llama

REFUSED = r"'model.layers.1.mlp.down_proj' is inside 'model.layers.1.mlp'.*preload_module_classes"


def preloaded(offload_dir):
    """:func:`conftest.tiny_llama` with its second decoder layer on disk, each ``LlamaMLP`` loaded whole by its hook."""
    from accelerate import dispatch_model

    return dispatch_model(tiny_llama(0), DEVICE_MAP, offload_dir=str(offload_dir), preload_module_classes=["LlamaMLP"])


@pytest.mark.parametrize("what", ["modules_to_save", "target"])
def test_a_module_inside_a_preloaded_module_is_refused_by_name(tmp_path, input_ids, what):
    """``modules_to_save=["model.layers.1.mlp.down_proj"]`` inside an offloaded ``LlamaMLP`` dispatched with
    ``preload_module_classes``: the wrapping passed and every forward then failed with accelerate's ``KeyError:
    'model.layers.1.mlp.down_proj.original_module.weight'`` (the hook loads the subtree's tensors by their dispatched
    names); an adapter on it was refused as if the model had never been loaded. Both are refused naming the
    preloading module, and the model runs as before."""
    pytest.importorskip("accelerate")
    model = preloaded(tmp_path / "offload")
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    kw = (
        dict(target_modules=["model.layers.0.self_attn.q_proj"], modules_to_save=["model.layers.1.mlp.down_proj"])
        if what == "modules_to_save"
        else dict(target_modules=["model.layers.1.mlp.down_proj"])
    )
    with pytest.raises(TargetModulesError, match=REFUSED):
        get_lordba_model(model, LoRDBAConfig(r=4, **kw))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, before)


def test_loading_a_trained_copy_inside_a_preloaded_module_is_refused_by_name(tmp_path, input_ids):
    """An adapter whose file holds a trained copy of ``model.layers.1.mlp.down_proj`` loaded onto that model: the
    load passed and the forward failed (``KeyError``); it is refused naming the preloading module."""
    pytest.importorskip("accelerate")
    config = LoRDBAConfig(
        r=4, target_modules=["model.layers.0.self_attn.q_proj"], modules_to_save=["model.layers.1.mlp.down_proj"]
    )
    get_lordba_model(tiny_llama(0), config).save_pretrained(tmp_path / "adapter")
    model = preloaded(tmp_path / "offload")
    with pytest.raises(TargetModulesError, match=REFUSED):
        LoRDBAModel.from_pretrained(model, tmp_path / "adapter")
    with torch.no_grad():
        model(input_ids=input_ids)
