"""Wrapping a model that accelerate loaded with some modules offloaded (``device_map`` with ``offload_folder``: their
weights sit on ``meta``, and each module's hook loads them for a call)."""

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.nn.model import LoRDBAModel

from conftest import tiny_llama

PARTS = ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb")


def test_modules_to_save_of_an_offloaded_module_train_save_and_load_as_in_memory(tmp_path, input_ids):
    """``modules_to_save=["lm_head"]`` with ``lm_head`` offloaded to disk: the trained copy was a deep copy of the
    module with its hook, which loaded the original weights into the copy for each call and dropped them after: its
    own weights (on ``meta``) were never used, so training changed nothing (loss after two steps 4.605 instead of
    4.592, logits off by 0.26), save_pretrained failed ("Cannot copy out of meta tensor"), and a loaded adapter's
    head was ignored. The copy now holds the weights, as in memory."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "base")
    offloaded = {**dict.fromkeys(PARTS, "cpu"), "lm_head": "disk"}

    def load(device_map):
        kw = {"device_map": device_map, "offload_folder": str(tmp_path / "offload")} if device_map else {}
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", **kw).eval()

    def run(device_map):
        torch.manual_seed(5)
        lm = get_lordba_model(load(device_map), LoRDBAConfig(r=4, init="random", modules_to_save=["lm_head"]))
        lm.train()
        optimizer = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            loss = lm(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        lm.eval()
        with torch.no_grad():
            out = lm(input_ids=input_ids).logits
        lm.save_pretrained(tmp_path / str(bool(device_map)))
        again = LoRDBAModel.from_pretrained(load(device_map), tmp_path / str(bool(device_map)))
        with torch.no_grad():
            loaded = again(input_ids=input_ids).logits
            with again.disable_adapter():
                base = again(input_ids=input_ids).logits
        return loss.detach(), out, loaded, base, lm

    want, got = run(None), run(offloaded)
    assert got[-1].base_model.lm_head.original_module.weight.is_meta
    assert not torch.allclose(want[1], want[3], atol=1e-2)  # the trained head changes the logits
    for g, w in zip(got[:4], want[:4]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
