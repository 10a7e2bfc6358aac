"""``torch.export`` of a wrapped model (what an on-device user tries): the LoRDBAModel itself, not only its base."""

import pytest
import torch

from lordba import LoRDBAConfig, get_lordba_model
from lordba.errors import AdapterStateError

from conftest import tiny_llama


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_a_lordba_model_captures_its_active_adapters(strict, input_ids):
    """``torch.export.export(lm, ...)`` failed: without ``strict`` (torch's default) with "AttributeError:
    'ForwardWithSignature' object has no attribute '__code__'", and with it on the wrapper's call frame that
    torch.compile runs eagerly ("Skip inlining torch.compiler.disable()d function"; torch.export refuses such a
    frame). It exports the active adapters (none in a ``disable_adapter()`` block), as the model computes them;
    ``adapter_names`` (a per-call routing no exported graph holds) is refused by name (dynamo, under ``strict``,
    wraps the error, its text kept)."""
    torch.manual_seed(3)
    lm = get_lordba_model(tiny_llama(0), LoRDBAConfig(r=4, init="random")).eval()
    for adapter in lm.adapter_modules("default").values():
        with torch.no_grad():
            adapter.scale_out.mul_(30)
    lm.add_adapter("other", LoRDBAConfig(r=4, init="random"))
    kwargs = {"use_cache": False}
    with torch.no_grad():
        want = lm(input_ids, **kwargs).logits
        with lm.disable_adapter():
            base = lm(input_ids, **kwargs).logits
        assert not torch.allclose(want, base, atol=1e-2)
        program = torch.export.export(lm, (input_ids,), kwargs=kwargs, strict=strict)
        torch.testing.assert_close(program.module()(input_ids, **kwargs).logits, want, atol=1e-5, rtol=1e-5)
        with lm.disable_adapter():
            program = torch.export.export(lm, (input_ids,), kwargs=kwargs, strict=strict)
        torch.testing.assert_close(program.module()(input_ids, **kwargs).logits, base, atol=1e-5, rtol=1e-5)
        refused = AdapterStateError if not strict else (AdapterStateError, torch._dynamo.exc.Unsupported)  # (its text)
        with pytest.raises(refused, match="export without adapter_names"):
            torch.export.export(
                lm, (input_ids,), kwargs={**kwargs, "adapter_names": ["default", "other", "default"]}, strict=strict
            )
        torch.testing.assert_close(lm(input_ids, **kwargs).logits, want)  # the model itself is as it was
