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


def test_quantizing_a_multimodal_models_tied_head_leaves_the_shared_text_config_alone():
    """A multimodal model (Gemma 3's, as ``AutoModelForCausalLM`` loads gemma-3-4b-it) keeps its text modules on its
    config's ``text_config``. Untying its quantized head copied the top config alone: the text modules kept the
    caller's ``text_config``, shared with another model, so switching the quantized model to lordba's attention
    (``use_packed_gqa``, as ``lordba generate`` does) switched the other model's text attention too."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from lordba.nn.attention import NAME, use_packed_gqa

    text = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    quantized, other = Gemma3ForConditionalGeneration(config).eval(), Gemma3ForConditionalGeneration(config).eval()
    quantize_model(quantized, backend="q4", group_size=32, head_bits=8)
    assert not quantized.config.tie_word_embeddings and config.tie_word_embeddings
    assert quantized.model.language_model.config is quantized.config.text_config
    assert quantized.model.language_model.config is not config.text_config
    assert use_packed_gqa(quantized) and quantized.model.language_model.config._attn_implementation == NAME
    assert other.model.language_model.config._attn_implementation == "sdpa"
    assert config.text_config._attn_implementation == "sdpa"
