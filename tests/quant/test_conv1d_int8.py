"""GPT-2 ``Conv1D`` and bitsandbytes int8 (``Linear8bitLt``) bases (issue 14)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lordba import LoRDBAConfig, get_lordba_model
from lordba.quant import resolve_backend


def test_conv1d_backend_features_dequantize_merge():
    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # in 4, out 6; weight stored 4 x 6
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    backend = resolve_backend(conv)
    assert backend.name == "conv1d" and backend.features(conv) == (4, 6)
    x = torch.randn(3, 4)
    dense = backend.dequantize(conv)
    torch.testing.assert_close(conv(x), x @ dense.T + conv.bias)
    delta = torch.randn(6, 4)
    backend.merge(conv, delta)
    torch.testing.assert_close(conv(x), x @ (dense + delta).T + conv.bias, rtol=1e-5, atol=1e-5)
    backend.unmerge(conv, delta)
    torch.testing.assert_close(backend.dequantize(conv), dense, rtol=0, atol=1e-6)


def test_gpt2_all_linear_targets_conv1d_and_merges_exactly():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32)).eval()
    ids = torch.randint(0, 101, (2, 6))
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random"))
    assert {p.rsplit(".", 1)[-1] for p in lm.adapter_modules("default")} == {"c_attn", "c_proj", "c_fc"}
    with torch.no_grad():
        out = lm(input_ids=ids).logits
        lm.merge_adapter()
        torch.testing.assert_close(lm(input_ids=ids).logits, out, rtol=1e-4, atol=1e-4)


def test_bnb_int8_base_dequantizes_and_carries_an_adapter():
    bnb = pytest.importorskip("bitsandbytes")  # an install dependency; skipped only where it is absent
    from lordba.quant.bnb import make_linear8bit

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q = make_linear8bit(linear.weight.data, linear.bias)
    assert isinstance(q, bnb.nn.Linear8bitLt)
    backend = resolve_backend(q)
    assert backend.name == "bnb-int8" and backend.features(q) == (64, 32)
    assert backend.describe(q) == {"backend": "bnb-int8", "bits": 8, "group_size": None}
    w = backend.dequantize(q)
    assert float((w - linear.weight).abs().max()) < 2e-3  # int8 rounding, per-row absmax
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x).float(), x @ w.T + linear.bias, rtol=0, atol=2e-2)
        merged = backend.merge(q, torch.ones(32, 64) * 0.01)
        assert float((backend.dequantize(merged) - (w + 0.01)).abs().max()) < 2e-3


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=101, n_positions=32)).eval()


@pytest.mark.parametrize("backend", ["q4", "hqq", "bnb"])
def test_quantize_model_quantizes_gpt2_conv1d_projections(backend):
    """``quantize_model`` replaced only ``nn.Linear`` layers: on GPT-2 (``Conv1D`` projections) it quantized the head
    alone (q4) or nothing, and recorded the model as quantized. Every ``Conv1D`` is now a quantized ``in → out`` layer
    of its transposed weight, outputs close to the float model's, and adapters attach, train and merge on them."""
    from lordba.quant import quantize_model

    if backend == "bnb":
        pytest.importorskip("bitsandbytes")
    ref = _gpt2()
    ids = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    model = quantize_model(_gpt2(), backend, bits=4, group_size=64)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert {
        resolve_backend(model.get_submodule(f"transformer.h.0.{p}")).name for p in ("attn.c_attn", "mlp.c_proj")
    } == {{"q4": "q4", "hqq": "hqq", "bnb": "bnb"}[backend]}
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert float((got - expected).norm() / expected.norm()) < 0.1
    torch.manual_seed(0)  # the adapter's own draw (the bound below holds for most, not every, random adapter)
    lm = get_lordba_model(model, LoRDBAConfig(r=4, init="random"))
    assert {p.rsplit(".", 1)[-1] for p in lm.adapter_modules("default")} == {"c_attn", "c_proj", "c_fc"}
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in lm.named_parameters() if p.requires_grad)
    lm.eval()
    with torch.no_grad():
        out = lm(input_ids=ids).logits
        lm.merge_adapter()  # q4, hqq, bnb: requantized (lossy), far closer to the adapted model than the base is
        assert float((lm(input_ids=ids).logits - out).norm()) < 0.3 * float((got - out).norm())
