"""``quant.quantize``: quantizing a model whose output head is tied changes no other model's config."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lordba.quant import quantize_model

from conftest import TINY


def test_quantizing_a_tied_head_leaves_a_shared_config_and_its_other_model_alone(tmp_path):
    """Two models built from one config share it (as transformers keeps it: no copy). Quantizing one's tied head
    wrote ``tie_word_embeddings = False`` into that config, so the other model, still tied, saved its head as the
    embeddings' tied copy (left out of the file) under a config that said untied: reloaded, its head was random."""
    config = LlamaConfig(**TINY, tie_word_embeddings=True)
    torch.manual_seed(0)
    quantized, other = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    quantize_model(quantized, backend="q4", group_size=64, head_bits=8)
    assert config.tie_word_embeddings and other.config is config
    assert not quantized.config.tie_word_embeddings and quantized.model.config is quantized.config
    other.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.lm_head.weight, other.lm_head.weight)
