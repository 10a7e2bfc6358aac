"""Trained biases (``bias="lora_only"`` / ``"all"``) on layers that accelerate offloads (``dispatch_model`` with an
``offload_dir``: their weights and biases sit on ``meta``, and each layer's hook loads them for a call)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lordba import LoRDBAConfig, get_lordba_model
from lordba.nn.model import LoRDBAModel

from conftest import TINY

DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def biased_llama(offload_dir=None) -> LlamaForCausalLM:
    """:func:`conftest.tiny_llama`'s shape with biases on its attention and MLP layers; with ``offload_dir``, its
    second decoder layer offloaded to disk."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)).eval()
    if offload_dir is None:
        return model
    from accelerate import dispatch_model

    return dispatch_model(model, DEVICE_MAP, offload_dir=str(offload_dir))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_of_offloaded_layers_train_save_and_load_as_in_memory(tmp_path, input_ids, bias):
    """Adding an adapter with trained biases failed on a model with offloaded layers ("Cannot copy out of meta
    tensor": its zero bias change was made like the base bias, on ``meta``), and saving or loading one read that
    base bias there too. The offloaded layers' base biases are now the ones their hooks load: training, saving and
    loading give what they give in memory."""
    pytest.importorskip("accelerate")

    def run(offload: bool):
        where = tmp_path / ("offloaded" if offload else "memory")

        def load():
            return biased_llama(where / "offload" if offload else None)

        torch.manual_seed(5)
        lm = get_lordba_model(load(), LoRDBAConfig(r=4, init="random", bias=bias, target_modules=["q_proj", "v_proj"]))
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
        changed = lm.adapter_modules("default")["model.layers.1.self_attn.q_proj"].bias_delta.detach().clone()
        lm.save_pretrained(where / "adapter")
        again = LoRDBAModel.from_pretrained(load(), where / "adapter")
        with torch.no_grad():
            loaded = again(input_ids=input_ids).logits
        return loss.detach(), out, loaded, changed, again

    want, got = run(False), run(True)
    assert got[-1].base_model.model.layers[1].self_attn.q_proj.base_layer.bias.is_meta  # offloaded indeed
    assert want[3].abs().max() > 0  # the offloaded layer's bias trained
    for g, w in zip(got[:4], want[:4]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
