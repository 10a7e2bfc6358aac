"""AutoLoRDBAModelForCausalLM: the base model named in the adapter config, then the adapter on it."""

import pytest
import torch

from lordba import AutoLoRDBAModelForCausalLM, ConfigError, LoRDBAConfig, LoRDBAModel, get_lordba_model

from conftest import tiny_llama

IDS = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def saved(tmp_path):
    """A base saved in transformers' format, and an adapter trained on it (its config names the base)."""
    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lm = get_lordba_model(base, LoRDBAConfig(r=2, init="random"))
    lm.save_pretrained(tmp_path / "adapter")
    return tmp_path, lm


def test_loads_the_base_the_adapter_names_and_the_adapter(saved):
    tmp_path, lm = saved
    auto = AutoLoRDBAModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    assert isinstance(auto, LoRDBAModel) and auto.active_adapters == ["default"]
    assert auto.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    torch.testing.assert_close(logits(auto), logits(lm.eval()), rtol=0, atol=1e-5)


def test_is_trainable_and_adapter_name_are_passed_on(saved):
    tmp_path, _ = saved
    auto = AutoLoRDBAModelForCausalLM.from_pretrained(tmp_path / "adapter", adapter_name="chat", is_trainable=True)
    assert auto.active_adapters == ["chat"]
    assert any(p.requires_grad for p in auto.parameters())


def test_an_adapter_without_a_base_path_is_a_clear_error(tmp_path):
    model = tiny_llama(0)
    model.config._name_or_path = ""
    get_lordba_model(model, LoRDBAConfig(r=2)).save_pretrained(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"adapter_config\.json: base_model_name_or_path is not set"):
        AutoLoRDBAModelForCausalLM.from_pretrained(tmp_path / "a")


def test_the_class_is_not_instantiated_directly():
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoLoRDBAModelForCausalLM()


def test_a_base_model_that_cannot_be_loaded_is_named_with_what_to_do(tmp_path, monkeypatch):
    # transformers' bare OSError ("We couldn't connect to 'https://huggingface.co' ...") named neither the
    # base model nor the adapter config it came from
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    model = tiny_llama(0)
    model.config._name_or_path = "someone/base-not-cached"
    get_lordba_model(model, LoRDBAConfig(r=2)).save_pretrained(tmp_path / "a")
    with pytest.raises(
        ConfigError, match=r"adapter_config\.json: base_model_name_or_path 'someone/base-not-cached'"
    ) as err:
        AutoLoRDBAModelForCausalLM.from_pretrained(tmp_path / "a", cache_dir=tmp_path / "empty-cache")
    assert "LoRDBAModel.from_pretrained(base_model" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
