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


def test_a_peft_lora_folder_read_as_a_lordba_adapter_says_how_to_convert_it(tmp_path):
    # a new user's first mix-up (`lordba generate --adapter`, `inspect`, `export-lora` or from_pretrained of a
    # PEFT LoRA folder) was refused with "peft_type is 'LORA', not 'LORDBA'" alone: nothing said what to do
    from peft import LoraConfig

    LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"adapter_config\.json: peft_type is 'LORA', not 'LORDBA'.*lordba convert"):
        LoRDBAConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"peft_type is 5, not 'LORDBA'$"):  # not a PEFT type at all: no hint
        LoRDBAConfig.from_dict({"peft_type": 5})


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


def _cache_config(cache, repo_id, config, commit, subfolder=""):
    """``config``'s adapter_config.json in an HF cache, laid out as huggingface_hub leaves a download."""
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit / subfolder
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    data = json.dumps(config.to_dict()).encode()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / "adapter_config.json")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_from_pretrained_reads_a_subfolder_and_a_hub_id_from_the_cache(tmp_path, offline_cache):
    """PeftConfig.from_pretrained(id, subfolder=, revision=, cache_dir=) reads a subfolder and a Hub id; lordba's took
    a local folder only (a Hub id: AdapterFormatError 'not a directory'; subfolder=: TypeError)."""
    cfg = LoRDBAConfig(r=4, target_modules=["q_proj"])
    (tmp_path / "local" / "named").mkdir(parents=True)
    (tmp_path / "local" / "named" / "adapter_config.json").write_text(json.dumps(cfg.to_dict()))
    assert LoRDBAConfig.from_pretrained(tmp_path / "local", subfolder="named") == cfg
    assert LoRDBAConfig.from_pretrained(str(tmp_path / "local"), "named") == cfg

    other = LoRDBAConfig(r=8, target_modules=["v_proj"])
    _cache_config(offline_cache, "someone/cfg", cfg, "a" * 40)
    _cache_config(offline_cache, "someone/cfg", other, "a" * 40, subfolder="b")
    assert LoRDBAConfig.from_pretrained("someone/cfg") == cfg
    assert LoRDBAConfig.from_pretrained("someone/cfg", subfolder="b", revision="a" * 40) == other
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _cache_config(elsewhere, "someone/cfg2", other, "c" * 40)
    assert LoRDBAConfig.from_pretrained("someone/cfg2", cache_dir=elsewhere, local_files_only=True) == other


def test_from_pretrained_of_a_hub_id_without_the_config_is_refused_naming_it(offline_cache):
    """As the model's loaders refuse the same id (AdapterFormatError: a caller's ``except`` catches both alike; a
    missing relative path that looks like a repo id, ``out/adapter``, is one)."""
    cfg = LoRDBAConfig(r=4, target_modules=["q_proj"])
    _cache_config(offline_cache, "someone/cfg", cfg, "a" * 40, subfolder="b")
    missing = r"Hub repo 'someone/cfg' \(revision main\) has no adapter_config.json"
    with pytest.raises(AdapterFormatError, match=missing):
        LoRDBAConfig.from_pretrained("someone/cfg")
    with pytest.raises(AdapterFormatError, match=r"has no c/adapter_config.json"):
        LoRDBAConfig.from_pretrained("someone/cfg", subfolder="c")
    with pytest.raises(AdapterFormatError, match=r"'someone/missing'.*Hugging Face Hub") as err:
        LoRDBAConfig.from_pretrained("someone/missing")
    assert "\n" not in str(err.value)
    with pytest.raises(AdapterFormatError, match=r"subfolder '\.\./b'"):
        LoRDBAConfig.from_pretrained("someone/cfg", subfolder="../b")


@pytest.mark.parametrize(
    ("name", "near"),
    [("rank", "r"), ("target_modules_", "target_modules"), ("scale_dtyp", "scale_dtype"), ("zzz", None)],
)
def test_an_argument_that_is_no_field_is_a_config_error_naming_the_nearest_field(name, near):
    """``LoRDBAConfig(rank=4)`` raised the dataclass's plain TypeError ("unexpected keyword argument"); it is the
    library's ConfigError naming the argument, the field meant where one is near, and the fields."""
    with pytest.raises(ConfigError) as err:
        LoRDBAConfig(**{name: 4})
    message = str(err.value)
    assert f"no field '{name}'" in message and "its fields: " in message and "scale_dtype" in message
    assert (f"did you mean '{near}'?" in message) if near else "did you mean" not in message
