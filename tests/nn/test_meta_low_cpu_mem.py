"""PEFT's ``low_cpu_mem_usage`` keyword (adapter weights made empty on ``meta``, filled by a later load) on lordba's
calls that PEFT's take it on: a load accepts it (lordba builds a loaded adapter from the file's tensors, never
initialising one first), a new adapter refuses it by name."""

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.errors import ConfigError
from lordba.nn.model import LoRDBAModel

from conftest import tiny_llama


def test_loading_with_low_cpu_mem_usage_loads_the_adapter_as_without(tmp_path, input_ids):
    """``LoRDBAModel.from_pretrained(model, dir, low_cpu_mem_usage=True)`` and ``load_adapter(...,
    low_cpu_mem_usage=True)``, PEFT's calls, raised TypeError ("unexpected keyword argument"). Both load the adapter
    as without it (nothing on ``meta``)."""
    torch.manual_seed(0)
    get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random")).save_pretrained(tmp_path)
    want = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path)
    got = LoRDBAModel.from_pretrained(tiny_llama(0), tmp_path, low_cpu_mem_usage=True)
    got.load_adapter(tmp_path, "other", low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in [*got.parameters(), *got.buffers()])
    with torch.no_grad():
        expected = want(input_ids=input_ids).logits
        torch.testing.assert_close(got(input_ids=input_ids).logits, expected)
        torch.testing.assert_close(got(input_ids=input_ids, adapter_names=["other"] * 3).logits, expected)


@pytest.mark.parametrize("call", ["get_lordba_model", "add_adapter"])
def test_a_new_adapter_with_low_cpu_mem_usage_is_refused_by_name(call):
    """``get_lordba_model(model, config, low_cpu_mem_usage=True)`` / ``add_adapter(..., low_cpu_mem_usage=True)``
    (PEFT's empty adapter, for a load to fill) raised TypeError; lordba makes no empty adapters, so they are refused
    naming the keyword and the load that does the same, the model left as it was."""
    model = tiny_llama(0)
    with pytest.raises(ConfigError, match=rf"{call}\(low_cpu_mem_usage=True\).*from_pretrained"):
        if call == "get_lordba_model":
            get_lordba_model(model, LoRDBAConfig(r=4), low_cpu_mem_usage=True)
        else:
            wrapper = LoRDBAModel(model)
            wrapper.add_adapter("default", LoRDBAConfig(r=4), low_cpu_mem_usage=True)
    if call == "get_lordba_model":
        assert all(p.requires_grad for p in model.parameters())
    else:
        assert not wrapper.peft_config
    assert get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4), low_cpu_mem_usage=False).peft_config  # PEFT's default
