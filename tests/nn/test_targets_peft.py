"""A PEFT LoRA user's settings, moved to ``LoRDBAConfig``, adapt the same modules with the same rank and scaling.

Each case builds PEFT's LoRA model and lordba's from the same ``LoraConfig`` (``LoRDBAConfig.from_peft``) on a tiny
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
    lm = get_lordba_model(model, LoRDBAConfig.from_peft(peft.LoraConfig(**fields)))
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


def test_from_peft_takes_loras_fields_and_refuses_what_it_has_no_counterpart_for():
    """A PEFT user's ``LoraConfig`` becomes a LoRDBA config with its fields under LoRDBA's names; options LoRDBA has
    no counterpart for (DoRA, rsLoRA, another init, layer replication) are refused naming them rather than dropped,
    as is an unset ``target_modules`` (PEFT's per-model default is not LoRDBA's every linear layer). PEFT's names
    given to ``LoRDBAConfig`` itself were a bare ``TypeError``; they are a ConfigError naming LoRDBA's field."""
    from lordba.errors import ConfigError

    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="all")
    for given in (lora, lora.to_dict()):
        cfg = LoRDBAConfig.from_peft(given)
        assert (cfg.r, cfg.alpha, cfg.dropout, cfg.bias) == (8, 16.0, 0.05, "all")
        assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    for field, value in [("use_dora", True), ("use_rslora", True), ("init_lora_weights", "gaussian"),
                         ("layer_replication", [[0, 1]])]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"LoraConfig\.{field}="):
            LoRDBAConfig.from_peft(peft.LoraConfig(target_modules=["q_proj"], **{field: value}))
    with pytest.raises(ConfigError, match="target_modules is not set"):
        LoRDBAConfig.from_peft(peft.LoraConfig())
    with pytest.raises(ConfigError, match="not a LoRA"):
        LoRDBAConfig.from_peft({"peft_type": "IA3", "target_modules": ["q_proj"]})
    for name, hint in [("lora_alpha", "'alpha'"), ("lora_dropout", "'dropout'"), ("use_rslora", "√r")]:
        with pytest.raises(ConfigError, match=f"LoRDBAConfig\\({name}=.*{hint}.*from_peft"):
            LoRDBAConfig(r=4, **{name: 1})
