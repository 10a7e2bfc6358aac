import json

import pytest

from lordba import AdapterFormatError, ConfigError, LoRDBAConfig


def test_defaults_and_round_trip():
    cfg = LoRDBAConfig()
    assert cfg.r == 16 and cfg.alpha == 32.0 and cfg.scale_dtype == "float16" and cfg.peft_type == "LORDBA"
    data = cfg.to_dict()
    assert data["peft_type"] == "LORDBA" and data["format_version"] == 1 and "lora_alpha" not in data
    assert LoRDBAConfig.from_dict(data) == cfg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": 2.0}, "r"),
        ({"r": True}, "r"),
        ({"alpha": -1}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"scale_dtype": "fp8"}, "scale_dtype"),
        ({"init": "gaussian"}, "init"),
        ({"mode": "full"}, "mode"),
        ({"ste": "sigmoid"}, "ste"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": [1]}, "target_modules"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": ["q"]}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
        ({"latent_dtype": "int8"}, "latent_dtype"),
    ],
)
def test_invalid_fields_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LoRDBAConfig(**kwargs)


def test_from_dict_errors():
    with pytest.raises(ConfigError, match="expected a JSON object"):
        LoRDBAConfig.from_dict([1])
    with pytest.raises(ConfigError, match="unknown field"):
        LoRDBAConfig.from_dict({"r": 4, "lora_alpha": 8})
    with pytest.raises(AdapterFormatError, match="format_version 9"):
        LoRDBAConfig.from_dict({"format_version": 9})
    with pytest.raises(ConfigError, match="format_version must be an integer"):
        LoRDBAConfig.from_dict({"format_version": "1"})


def test_rank_and_alpha_patterns():
    cfg = LoRDBAConfig(
        r=8,
        alpha=16,
        rank_pattern={"down_proj": 4, r"layers\.0\.self_attn\.q_proj": 32},
        alpha_pattern={"down_proj": 2.0},
    )
    assert cfg.rank_for("model.layers.3.mlp.down_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 32
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 8
    assert cfg.scaling_for("model.layers.3.mlp.down_proj") == 0.5
    assert cfg.scaling_for("model.layers.3.mlp.up_proj") == 2.0


def test_save_and_load(tmp_path):
    cfg = LoRDBAConfig(r=4, target_modules=["q_proj"], scale_dtype="int8")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg.to_dict()))
    assert LoRDBAConfig.from_pretrained(tmp_path) == cfg


def test_every_field_has_help():
    import dataclasses

    for f in dataclasses.fields(LoRDBAConfig):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"], f.name


def test_peft_fields_are_validated_and_omitted_at_their_defaults():
    """Issue 14: PEFT-named fields, validated; an adapter that uses none of them writes today's keys."""
    cfg = LoRDBAConfig(
        modules_to_save=["score"],
        task_type="SEQ_CLS",
        bias="lora_only",
        dropout=0.1,
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        base_quantization={"backend": "hqq", "bits": 4, "group_size": 64},
    )
    assert LoRDBAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.saved_modules == ["score", "classifier"]
    assert cfg.targets_module("model.layers.2.mlp.up_proj") and not cfg.targets_module("model.layers.1.mlp.up_proj")
    assert "bias" not in LoRDBAConfig().to_dict() and "base_quantization" not in LoRDBAConfig().to_dict()
    assert LoRDBAConfig.from_dict({**LoRDBAConfig().to_dict(), "format_version": 2}) == LoRDBAConfig()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"modules_to_save": "score"}, "modules_to_save"),
        ({"task_type": "CLS"}, "task_type"),
        ({"bias": "some"}, "bias"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": True}, "dropout"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"layers_pattern": "a.*"}, "layers_pattern"),
        ({"layers_pattern": "layers"}, "layers_pattern is given without layers_to_transform"),  # PEFT's rule
        ({"base_quantization": {"backend": "hqq", "bits": 0, "group_size": 64}}, "base_quantization.bits"),
        ({"base_quantization": {"backend": "hqq"}}, "base_quantization"),
    ],
)
def test_invalid_peft_fields_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LoRDBAConfig(**kwargs)


def test_a_file_with_layers_pattern_alone_still_loads_as_what_it_ran():
    """A config written before layers_pattern alone was refused (where it selected nothing) loads, without it:
    the same layers as when it was written."""
    data = {**LoRDBAConfig().to_dict(), "layers_pattern": "layers"}
    assert LoRDBAConfig.from_dict(data) == LoRDBAConfig()
