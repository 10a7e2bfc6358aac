"""The model's index of its LoRDBA layers: one ``named_modules()`` walk per change of structure."""

import gc
import weakref

import pytest
import torch
from torch import nn

from lordba import LoRDBAConfig, get_lordba_model
from lordba.nn.layer import LoRDBALinear
from lordba.nn.structure import ModuleIndex, resolve

from conftest import tiny_llama


def counting_walks(monkeypatch):
    walks = []
    real = nn.Module.named_modules

    def named_modules(self, *args, **kwargs):
        walks.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", named_modules)
    return walks


def test_resolve_follows_the_module_tree():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    assert resolve(model, "1.1") is model[1][1] and resolve(model, "") is model
    assert resolve(model, "1.5") is None and resolve(model, "0.weight") is None


def test_layers_are_found_once_and_again_after_a_change(monkeypatch):
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    first = lm._lordba_layers()
    walks = counting_walks(monkeypatch)
    for _ in range(3):
        with torch.no_grad():
            lm(input_ids=torch.ones(1, 3, dtype=torch.long))  # a forward registers modules (transformers)
        assert lm._lordba_layers() == first
        lm.adapter_modules("default")
    assert sum(w is lm.base_model for w in walks) == 0  # nothing changed: no walk
    layers = lm.base_model.model.layers
    layers[0].self_attn.q_proj = LoRDBALinear(nn.Linear(64, 64))  # registration: walked again
    assert lm._lordba_layers()[0][1] is layers[0].self_attn.q_proj
    assert sum(w is lm.base_model for w in walks) == 1  # one walk (named_modules recurses: count the root)
    del layers[1].self_attn.v_proj  # no registration: the stale entry is seen on use
    assert "model.layers.1.self_attn.v_proj" not in dict(lm._lordba_layers())
    assert sum(w is lm.base_model for w in walks) == 2


def test_an_index_serves_one_root():
    a, b = nn.Sequential(LoRDBALinear(nn.Linear(2, 2))), nn.Sequential(nn.Linear(2, 2))
    index = ModuleIndex(LoRDBALinear)
    assert [p for p, _ in index.get(a)] == ["0"] and index.get(b) == []


def test_loading_an_adapter_walks_no_module_tree(tmp_path, monkeypatch, input_ids):
    """With the layers in place (a second adapter), a load resolves every path without a walk."""
    torch.manual_seed(1)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
    lm.save_pretrained(tmp_path)
    lm._lordba_layers()
    walks = counting_walks(monkeypatch)
    lm.load_adapter(tmp_path, "again")
    assert walks == []
    with torch.no_grad():
        lm.set_adapter("default")
        want = lm(input_ids=input_ids).logits
        lm.set_adapter("again")
        assert torch.equal(lm(input_ids=input_ids).logits, want)


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_layers_taken_out_of_the_model_are_freed_while_the_wrapper_lives(how):
    """The index keeps no layer the model no longer holds: after ``unload()`` / ``merge_and_unload()`` (the wrapper
    still alive, as in a notebook) the LoRDBA layers and their adapters (and, merged into a quantized base, the
    original base layers) were kept by the index until its next walk."""
    torch.manual_seed(1)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random"))
    adapters = [weakref.ref(a) for a in lm.adapter_modules("default").values()]
    layers = [weakref.ref(layer) for _, layer in lm._lordba_layers()]
    getattr(lm, how)()
    gc.collect()
    assert sum(ref() is not None for ref in layers) == 0
    assert sum(ref() is not None for ref in adapters) == 0
    assert lm._lordba_layers() == []
