"""The rules about a model's modules in lordba._util.modules."""

from __future__ import annotations

from torch import nn
from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig

from lordba._util.modules import context_positions


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
