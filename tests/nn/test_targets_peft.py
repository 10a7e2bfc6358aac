"""A PEFT LoRA user's settings, moved to ``LoRDBAConfig``, adapt the same modules with the same rank and scaling.

Each case builds PEFT's LoRA model and lordba's model from the same fields (``lora_alpha`` as ``alpha``) on a tiny
Llama, GPT-2 (``Conv1D``, layers under ``h``) or BERT (layers under ``layer``, a ``classifier`` head) and compares
the set of adapted module paths and each one's ``(r, scaling)``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model

from conftest import tiny_llama

peft = pytest.importorskip("peft")


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=3, hidden_size=16, num_attention_heads=2, intermediate_size=24, vocab_size=50,
        max_position_embeddings=16,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": _gpt2, "bert": _bert}


def _peft_adapted(model, fields: dict) -> dict[str, tuple[int, float]]:
    pm = peft.get_peft_model(model, peft.LoraConfig(**fields))
    return {
        name: (module.r["default"], module.scaling["default"])
        for name, module in pm.base_model.model.named_modules()
        if "default" in getattr(module, "lora_A", {})
    }


def _lordba_adapted(model, fields: dict) -> dict[str, tuple[int, float]]:
    fields = {("alpha" if k == "lora_alpha" else k): v for k, v in fields.items()}
    lm = get_lordba_model(model, LoRDBAConfig(**fields))
    return {path: (adapter.r, adapter.scaling) for path, adapter in lm.adapter_modules("default").items()}


CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules=["self_attn.q_proj"])),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules="ALL-LINEAR")),
    ("llama", dict(target_modules=r".*\.(q|k)_proj")),
    ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*mlp.*")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1)),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0], layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj", "model.layers.0.mlp.down_proj"], layers_to_transform=[1])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})),
    ("llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2, "model.layers.0.v_proj": 6})),
    ("llama", dict(target_modules=["q_proj", "v_proj"], rank_pattern={"_proj": 2, "layers.1.v_proj": 8})),
    ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[1, 2], layers_pattern="h")),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[1, 2])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], rank_pattern={"attn.c_proj": 2})),
    ("bert", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("bert", dict(target_modules=["query", "value"], layers_to_transform=[0, 2], layers_pattern=["h", "layer"])),
    ("bert", dict(target_modules=["dense"], task_type="SEQ_CLS")),
    ("bert", dict(target_modules=["dense"], exclude_modules=["output.dense"])),
    ("bert", dict(target_modules=["dense"], exclude_modules=r".*attention.*")),
]


@pytest.mark.parametrize("model,fields", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_the_same_settings_adapt_the_same_modules_with_the_same_rank_and_scaling_as_peft(model, fields):
    """``ALL-LINEAR`` (PEFT's shorthand is case-insensitive) matched no module; a ``target_modules`` entry that is a
    module's whole path was left out by ``layers_to_transform``, where PEFT adapts it whatever its layer."""
    fields = dict(r=4, lora_alpha=8, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _peft_adapted(MODELS[model](), dict(fields))
        ours = _lordba_adapted(MODELS[model](), dict(fields))
    assert theirs and ours == theirs


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_key_that_matches_no_adapted_module_warns_as_in_peft(field):
    """A typo in a ``rank_pattern`` / ``alpha_pattern`` key (``q_prj``) silently gave every module ``r`` /
    ``alpha``; PEFT warns (``RuntimeWarning``) naming the keys it ignored, and so does lordba."""
    fields = {field: {"q_prj": 8, "q_proj": 2}}
    with pytest.warns(RuntimeWarning, match=rf"{field} key\(s\) \['q_prj'\] matched no adapted module"):
        get_lordba_model(tiny_llama(), LoRDBAConfig(r=4, target_modules=["q_proj"], **fields))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        get_lordba_model(tiny_llama(), LoRDBAConfig(r=4, target_modules=["q_proj"], **{field: {"q_proj": 2}}))
