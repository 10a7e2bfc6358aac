"""A PEFT user's workflows, snippet by snippet: each lordba call beside PEFT's own on the same tiny model, where
docs/peft-parity.md says "same" (the result, its type, its side effects)."""

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from lordba import LoRDBAConfig, LoRDBAModel, get_lordba_model
from lordba.quant import quantize_model

from conftest import tiny_llama

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


@pytest.mark.parametrize("is_trainable", [False, True])
def test_loading_for_inference_puts_the_model_in_eval_mode_as_peft_does(tmp_path, is_trainable):
    """PEFT's ``from_pretrained`` / ``load_adapter`` without ``is_trainable`` call ``model.eval()`` (dropout off);
    lordba left a base in training mode so, and an adapter saved with ``dropout`` gave random outputs."""
    lm = get_lordba_model(tiny_llama(), LoRDBAConfig(r=4, init="random", dropout=0.5))
    lm.save_pretrained(tmp_path / "lordba")
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5)).save_pretrained(
        tmp_path / "peft"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(tiny_llama().train(), tmp_path / "peft", is_trainable=is_trainable)
    ours = LoRDBAModel.from_pretrained(tiny_llama().train(), tmp_path / "lordba", is_trainable=is_trainable)
    assert ours.training == peft.training == is_trainable
    assert ours.base_model.training == peft.get_base_model().training == is_trainable
    if not is_trainable:
        torch.testing.assert_close(ours(input_ids=IDS).logits, ours(input_ids=IDS).logits, rtol=0, atol=0)

    peft.train(), ours.train()  # load_adapter too: the model PEFT's call leaves in eval mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.load_adapter(tmp_path / "peft", "other", is_trainable=is_trainable)
    ours.load_adapter(tmp_path / "lordba", "other", is_trainable=is_trainable)
    assert ours.training == peft.training == is_trainable


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


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["hqq", "bnb", "q4"])
def test_parameter_counts_of_a_quantized_base_are_those_of_its_float_model(backend, bias):
    """``get_nb_trainable_parameters`` counts a quantized layer at the size of the weight it stands for: HQQ's packed
    ``W_q`` parameter was counted on top of it (77,020 "all params" instead of 58,588 here, so
    ``print_trainable_parameters`` showed 6.7% trainable instead of 8.8%), and its bias, a plain tensor, not at all."""

    def base():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=bias,
            mlp_bias=bias,
        )
        return LlamaForCausalLM(config).eval()

    plain = get_lordba_model(base(), LoRDBAConfig(r=4))
    quantized = get_lordba_model(quantize_model(base(), backend=backend, group_size=32), LoRDBAConfig(r=4))
    assert quantized.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
