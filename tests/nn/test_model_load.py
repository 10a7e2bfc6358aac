"""``nn.model_load``: an adapter loaded onto another base model than the one it records is loaded, with a warning."""

import warnings

import pytest
import torch

from lordba import BaseModelWarning, LoRDBAConfig, LoRDBAModel, get_lordba_model

from conftest import tiny_llama


@pytest.fixture
def saved(tmp_path):
    """An adapter saved from a base named ``org/Base-A`` (its ``base_model_name_or_path``)."""
    torch.manual_seed(0)
    base = tiny_llama(0)
    base.config._name_or_path = "org/Base-A"
    lm = get_lordba_model(base, LoRDBAConfig(r=2, init="random", target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path)
    return tmp_path


def _named(name: str):
    model = tiny_llama(0)
    model.config._name_or_path = name
    return model


def test_an_adapter_on_another_base_of_the_same_shapes_loads_with_a_warning_naming_both(saved):
    """The record was never compared: an adapter made for another model of the same layer names and shapes loaded
    silently and gave meaningless outputs. It still loads (a base folder may have moved), with a warning naming
    the file and both models; hot-swapping it in warns the same way."""
    with pytest.warns(BaseModelWarning, match=r"adapter_config\.json.*'org/Base-A'.*'other/Base-B'"):
        lm = LoRDBAModel.from_pretrained(_named("other/Base-B"), saved)
    assert "default" in lm.peft_config
    with pytest.warns(BaseModelWarning, match="'org/Base-A'"):
        lm.hotswap_adapter(saved, "default")


@pytest.mark.parametrize("name", ["org/Base-A", "/data/models/base-a/", "", "/cache/models--org--Base-A/snapshots/ab"])
def test_the_same_base_under_another_name_or_an_unnamed_one_loads_without_a_warning(saved, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelWarning)
        LoRDBAModel.from_pretrained(_named(name), saved)


LOADS = {
    "from_pretrained": lambda saved: LoRDBAModel.from_pretrained(_named("other/Base-B"), saved),
    "load_adapter": lambda saved: LoRDBAModel(_named("other/Base-B")).load_adapter(saved, "a"),
    "hotswap_adapter": lambda saved: _quiet_load(saved).hotswap_adapter(saved, "default"),
}


def _quiet_load(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BaseModelWarning)
        return LoRDBAModel.from_pretrained(_named("other/Base-B"), saved)


@pytest.mark.parametrize("call", sorted(LOADS))
def test_the_base_model_warning_names_the_users_line(saved, call):
    """The warning's file and line are the caller's, as Python shows them (was: from_pretrained's warning named a line
    of lordba/nn/model_load.py, a fixed stack level counting load_adapter's frames only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LOADS[call](saved)
    found = [w for w in caught if issubclass(w.category, BaseModelWarning)]
    assert len(found) == 1 and found[0].filename == __file__, [(w.filename, w.lineno) for w in found]
