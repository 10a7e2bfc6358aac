"""A PEFT user's workflows, snippet by snippet: each lordba call beside PEFT's own on the same tiny model, where
docs/peft-parity.md says "same" (the result, its type, its side effects)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MambaConfig, MambaForCausalLM

from lordba import LoRDBAConfig, get_lordba_model

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def tiny_mamba() -> MambaForCausalLM:
    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=101,
        hidden_size=32,
        state_size=4,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        tie_word_embeddings=False,
    )
    return MambaForCausalLM(config).eval()


def test_a_module_trained_in_full_shows_the_attributes_of_the_module_in_use():
    """PEFT's ``ModulesToSaveWrapper`` gives the active copy's attributes (the original's when disabled); lordba's
    wrapper had none, so model code reading them failed: Mamba's forward reads ``self.lm_head.weight.dtype``
    (AttributeError: 'SavedModule' object has no attribute 'weight')."""
    config = dict(r=4, target_modules=["in_proj"], modules_to_save=["lm_head"])
    peft = get_peft_model(tiny_mamba(), LoraConfig(**config))
    ours = get_lordba_model(tiny_mamba(), LoRDBAConfig(**config))
    assert ours(input_ids=IDS).logits.shape == peft(input_ids=IDS).logits.shape == (2, 7, 101)

    head = ours.get_output_embeddings()
    assert head.weight is head.lordba_saved["default"].weight and head.weight.requires_grad
    assert head.out_features == 101
    with ours.disable_adapter():
        assert head.weight is head.original_module.weight
    ours.disable_adapter_layers()
    assert head.weight is head.original_module.weight
    with pytest.raises(AttributeError, match="no_such_thing"):
        head.no_such_thing
