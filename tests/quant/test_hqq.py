"""The HQQ base: shapes HQQ cannot pack are refused with the library's error, before any layer is replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lordba.errors import ConfigError
from lordba.quant import quantize_model


class Two(nn.Module):
    def __init__(self, out_b: int) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(40, out_b, bias=False)


@pytest.mark.parametrize(("bits", "out_b", "group"), [(4, 20, 64), (2, 24, 64), (1, 20, 16), (8, 20, 64)])
def test_a_layer_hqq_cannot_pack_is_a_config_error_naming_it_and_the_model_is_untouched(bits, out_b, group):
    # 20x40 = 800 weights: 12.5 groups of 64 (HQQ fails in its packing with a bare RuntimeError);
    # 24x40 = 960: 15 groups, not a multiple of the 4 that 2-bit packing takes; 20x40 / 16 = 50 groups, not of 8
    model = Two(out_b)
    with pytest.raises(ConfigError, match=r"\bb\b.*hqq|hqq.*\bb\b"):
        quantize_model(model, "hqq", bits=bits, group_size=group)
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_shapes_hqq_packs_still_quantize(bits):
    model = quantize_model(Two(64), "hqq", bits=bits, group_size=16)  # 64 x 40 / 16 = 160 groups
    out = model.b(torch.randn(2, 40))
    assert out.shape == (2, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast", ["to", "method"])
def test_a_cast_hqq_base_computes_in_the_new_dtype(dtype, cast):
    """``HQQLinear`` keeps its compute dtype, scales, zeros and bias through a conversion of the model it is in (they
    are no buffers; its ``to``/``half`` do nothing): every forward of an HQQ base cast with ``model.to(torch.bfloat16)``
    or ``model.half()`` failed (``expected m1 and m2 to have the same dtype``), with or without an adapter. lordba's HQQ
    layers follow the cast (and a cast back), within the dtype's rounding."""
    from conftest import tiny_llama

    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    model = quantize_model(tiny_llama(0), "hqq", bits=4, group_size=8)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        if cast == "to":
            model.to(dtype)
        else:
            model.half() if dtype == torch.float16 else model.bfloat16()
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.compute_dtype == dtype and layer.dequantize().dtype == dtype
        got = model(input_ids=ids).logits
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0.05 * float(want.abs().max()))
        model.float()
        assert layer.compute_dtype == torch.float32
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0.05 * float(want.abs().max()))


def test_an_adapter_on_a_bfloat16_hqq_base_runs_fused_and_trains():
    """An adapter on an HQQ base cast to bfloat16: its kept call (``lordba::linear_branch`` on the dequantized
    bfloat16 weight) equals HQQ's forward then the branch, and the input's gradient through the frozen layer is the
    dequantized weight's."""
    from lordba.core.scales import get_codec
    from lordba.core.ste import STE
    from lordba.nn import fastpath
    from lordba.nn.adapter import TrainableAdapter
    from lordba.nn.layer import LoRDBALinear
    from lordba.quant.hqq import quantize_linear_hqq

    torch.manual_seed(0)
    layer = LoRDBALinear(quantize_linear_hqq(nn.Linear(64, 40), 4, 32, torch.float32))
    adapter = TrainableAdapter(64, 40, 8, 2.0, get_codec("int8"), STE(), init="random")
    layer.add_adapter("a", adapter.pack())
    layer.set_adapter("a")
    layer.to(torch.bfloat16)
    with torch.no_grad():
        for tokens in (1, 5):
            x = torch.randn(1, tokens, 64, dtype=torch.bfloat16)
            got = layer(x)
            assert fastpath.decode_call(layer, None, x) is not None
            want = layer.lordba_adapters["a"](x, layer.base_layer(x))
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    weight = layer.base_layer.dequantize()
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    layer.base_layer(x).float().sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 64), rtol=2e-2, atol=2e-2)


def test_an_adapter_on_an_hqq_base_trains_under_bfloat16_autocast():
    """A QAT step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what ``Trainer(bf16=True)`` runs) on an HQQ
    base: HQQ's backward multiplied the bfloat16 output gradient by its float32 dequantized weight, and
    ``loss.backward()`` failed (``expected m1 and m2 to have the same dtype``) on the first step. The gradients are
    float32's to bfloat16's rounding, and finite."""
    from lordba import LoRDBAConfig, get_lordba_model

    from conftest import tiny_llama

    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = {}
    for autocast in (False, True):
        torch.manual_seed(3)
        lm = get_lordba_model(quantize_model(tiny_llama(0), "hqq", bits=4, group_size=8), LoRDBAConfig(r=4))
        with torch.no_grad():
            for adapter in lm.adapter_modules("default").values():
                adapter.scale_out.normal_(0.0, 5e-4)
        lm.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[autocast] = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads[True].values())
    for name, want in grads[False].items():
        got = grads[True][name]
        assert float((got - want).norm() / want.norm()) < 0.1, name
