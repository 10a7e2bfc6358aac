"""The rules about a model's modules in lordba._util.modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig

from lordba import LoRDBAConfig, get_lordba_model
from lordba._util.modules import context_positions

from conftest import tiny_llama


def _with_config(config: object) -> nn.Module:
    module = nn.Module()
    module.config = config
    return module


def test_context_positions_reads_a_multimodal_configs_text_model():
    """gemma-3-4b-it loads (AutoModelForCausalLM) as Gemma3ForConditionalGeneration, whose config keeps the
    context in ``text_config``: it read as none, and ``lordba serve`` took the tokenizer's limit (2048 for
    Gemma 3's, not its 131072 positions) while ``lordba generate`` capped nothing."""
    text = Gemma3TextConfig(max_position_embeddings=512)
    assert context_positions(_with_config(Gemma3Config(text_config=text))) == 512
    assert context_positions(_with_config(LlamaConfig(max_position_embeddings=64))) == 64
    assert context_positions(nn.Linear(1, 1)) is None


def test_the_cache_keyword_and_output_follow_the_models_own_names():
    """transformers 5.25 renamed the KV cache's keyword and output field ``past_key_values`` to ``cache`` (the old
    name warns until 5.40): the serving batch and the ahead-of-time step pass and read whichever the model has."""
    from types import SimpleNamespace

    from lordba._util.modules import cache_keyword, output_cache

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=False):
            return SimpleNamespace(cache=cache)

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return SimpleNamespace(past_key_values=past_key_values)

    for model in (New(), Old()):
        out = model(None, **{cache_keyword(model): "kv"})
        assert output_cache(out) == "kv"
    assert cache_keyword(New()) == "cache" and cache_keyword(Old()) == "past_key_values"
    model = tiny_llama()
    assert cache_keyword(model) == cache_keyword(get_lordba_model(model, LoRDBAConfig(r=2)))  # the wrapper's forward
    assert cache_keyword(torch.compile(New())) == "cache"  # (a compiled module's forward: (*args, **kwargs))
