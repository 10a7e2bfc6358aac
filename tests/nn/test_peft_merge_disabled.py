"""merge_and_unload while the adapters are disabled by the caller (disable_adapter_layers(), or in its own
disable_adapter() block), as PEFT's: adapter_names=[] unloads and returns the bare base, a non-empty list (or the
default, the active adapters) merges them into the base it returns."""

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.nn.layer import LoRDBALinear

from conftest import tiny_llama

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapted():
    torch.manual_seed(1)
    return get_lordba_model(tiny_llama(0), LoRDBAConfig(r=2, init="random", target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("how", ["block", "layers"])
@pytest.mark.parametrize("names", [[], None, ["default"]])
def test_merge_and_unload_while_disabled_by_the_caller_does_what_peft_does(how, names):
    """PEFT (0.21) in both states: [] returns the bare base, None and ["default"] the merged base. lordba refused all
    three (AdapterStateError "the adapters are disabled")."""
    base_out = logits(tiny_llama(0))
    lm = adapted()
    adapter_out = logits(lm)
    assert not torch.allclose(adapter_out, base_out, atol=1e-4)
    if how == "block":
        with lm.disable_adapter():
            out = lm.merge_and_unload(adapter_names=names)
            torch.testing.assert_close(logits(lm), logits(out), rtol=0, atol=0)  # the block's calls: what it returned
    else:
        lm.disable_adapter_layers()
        out = lm.merge_and_unload(adapter_names=names)
    assert not any(isinstance(m, LoRDBALinear) for m in out.modules()) and not lm.peft_config
    want = base_out if names == [] else adapter_out
    torch.testing.assert_close(logits(out), want, rtol=1e-4, atol=1e-4)
