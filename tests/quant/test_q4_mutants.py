"""Fast tests of quant.q4's Python side (Q4Linear's checks, padding, forward paths, copies and conversions; Q4Backend's
merge, description and size) that kill the mutants test_q4_base.py let survive: each pins one decision of the code."""

import copy

import pytest
import torch

from lordba import AdapterStateError, ConfigError
from lordba.kernels.q4 import GEMM_MIN_TOKENS
from lordba.quant import Q4Linear, quantize_model, set_compute
from lordba.quant.q4 import Q4Backend, hold_weights_together, quantize_linear_q4

from conftest import tiny_llama


def test_only_4_or_8_bit_codes_and_a_positive_group_size_are_taken():
    layer = Q4Linear.from_weight(torch.randn(8, 64), group_size=32)
    with pytest.raises(ConfigError, match="bits=2"):
        Q4Linear(layer.qweight, layer.scale, layer.minus, 64, bits=2)
    for group_size in (0, -32):
        with pytest.raises(ConfigError, match=f"got {group_size}"):
            Q4Linear.from_weight(torch.randn(8, 64), group_size=group_size)


def test_the_bias_is_a_frozen_copy():
    weight, bias = torch.randn(8, 64), torch.randn(8)
    layer = Q4Linear.from_weight(weight, bias, group_size=32)
    want = bias.clone()
    bias.add_(1.0)  # the caller's tensor: the layer holds its own
    assert torch.equal(layer.bias, want) and not layer.bias.requires_grad


@pytest.mark.parametrize("bits", [4, 8])
def test_every_forward_path_adds_the_bias_and_computes_the_dequantized_weight(bits):
    """The bound call (no gradient), the op (the bound call declined) and the autograd path (an input that requires
    a gradient) give the same result as ``x @ dequantize().T + bias`` under ``exact``; the bound call is the op's call
    bit for bit at every token count (one token, below and at the GEMM's start) under ``fast``."""
    torch.manual_seed(0)
    layer = Q4Linear.from_weight(torch.randn(24, 96), torch.randn(24), group_size=32, bits=bits)
    layer.compute = "exact"
    w = layer.dequantize()
    for tokens in (1, 3, GEMM_MIN_TOKENS):
        x = torch.randn(tokens, 96)
        want = x @ w.T + layer.bias
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        xg = x.clone().requires_grad_()
        y = layer(xg)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        torch.testing.assert_close(xg.grad, w.sum(0).expand(tokens, -1), rtol=1e-5, atol=1e-5)
    layer.compute = "fast"
    for tokens in (1, 3, GEMM_MIN_TOKENS):
        x = torch.randn(tokens, 96)
        with torch.no_grad():
            got = layer(x)
            want = torch.ops.lordba.q4_linear(
                x, layer.qweight, layer.scale, layer.minus, 96, GEMM_MIN_TOKENS, bits, *layer._flags
            )
        assert torch.equal(got, want + layer.bias), tokens


def test_the_padded_last_group_keeps_the_range_of_its_own_weights():
    """A row whose length is not a multiple of the group size is padded with its last group's mean: padded with zeros
    (or the row's mean), the last group's range would take in the pad, and its 32 real weights, all near +10 while the
    first group's are near -10, lose most of their resolution."""
    torch.manual_seed(0)
    weight = torch.cat([torch.randn(16, 64) * 0.1 - 10, torch.randn(16, 32) * 0.1 + 10], dim=1)
    error = (Q4Linear.from_weight(weight, group_size=64).dequantize() - weight).abs()
    assert float(error[:, 64:].max()) < 0.05  # (the group's own range, 0.6, over 15 steps; padded with 0 or -3.3: >0.3)


def test_without_the_optimiser_a_group_spans_its_weights_min_to_max():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    plain = Q4Linear.from_weight(weight, group_size=32, optimize=False, round_zero=False).dequantize()
    got, want = plain.view(16, 2, 32), weight.view(16, 2, 32)
    torch.testing.assert_close(got.amax(-1), want.amax(-1), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got.amin(-1), want.amin(-1), rtol=2e-3, atol=2e-3)
    optimized = Q4Linear.from_weight(weight, group_size=32, round_zero=False).dequantize()
    assert (optimized - plain).abs().max() > 0.01  # (HQQ's optimiser moves the zero points)


@torch.no_grad()
def test_a_layer_that_ran_copies_and_pickles():
    """A layer keeps its bound call (a C++ object) after its first forward: a copy binds its own."""
    torch.manual_seed(0)
    layer = Q4Linear.from_weight(torch.randn(24, 64), torch.randn(24), group_size=32)
    x = torch.randn(2, 64)
    want = layer(x)
    assert "_call" in layer.__dict__
    copied = copy.deepcopy(layer)
    assert torch.equal(copied(x), want)
    other = Q4Linear.from_weight(torch.randn(24, 64), torch.randn(24), group_size=32)
    copied.load_state_dict(other.state_dict())  # in place: the copy's own tensors, not the original's
    assert torch.equal(copied(x), other(x)) and torch.equal(layer(x), want)


@torch.no_grad()
def test_a_q4_model_whose_weights_are_held_together_saves_whole_with_torch_save(tmp_path, input_ids):
    model = quantize_model(tiny_llama(0), backend="q4", group_size=32)
    want = model(input_ids=input_ids).logits
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(input_ids=input_ids).logits, want)


def test_weights_held_together_already_stay_where_they_are():
    model = quantize_model(tiny_llama(0), backend="q4", group_size=32)
    layers = [m for m in model.modules() if isinstance(m, Q4Linear)]
    where = [getattr(m, n).data_ptr() for m in layers for n in ("qweight", "scale", "minus")]
    held = hold_weights_together(model)
    assert held == sum(getattr(m, n).nbytes for m in layers for n in ("qweight", "scale", "minus"))
    assert [getattr(m, n).data_ptr() for m in layers for n in ("qweight", "scale", "minus")] == where


def test_a_move_and_a_cast_in_one_call_move_the_stored_scales_too():
    layer = Q4Linear.from_weight(torch.randn(8, 64), torch.randn(8), group_size=32)
    layer.to("meta", torch.float64)
    assert layer.qweight.is_meta and layer.bias.dtype == torch.float64
    for tensor in (layer.scale, layer.minus):
        assert tensor.is_meta and tensor.dtype == torch.float16


def test_set_compute_refuses_an_unknown_name_on_a_model_without_q4_layers():
    with pytest.raises(ConfigError, match="int8"):
        set_compute(torch.nn.Sequential(torch.nn.Linear(2, 2)), "int8")


def test_a_group_whose_scale_overflows_float16_is_refused_by_quantizing_and_merging():
    """A group spanning 0 to 1e6 needs a scale of 1e6 / 15 > 65504 (its offset stays 0): the float16 scale is inf."""
    linear = torch.nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[2] = 0.0
        linear.weight[2, 7] = 1e6
    with pytest.raises(ConfigError, match=r"here.*float16"):
        quantize_linear_q4(linear, 32, where="here")
    layer = Q4Linear.from_weight(torch.zeros(8, 64), group_size=32)
    delta = torch.zeros(8, 64)
    delta[2, 7] = 1e6
    with pytest.raises(AdapterStateError, match="float16"):
        Q4Backend().merge(layer, delta)


@pytest.mark.parametrize("bits", [4, 8])
def test_merging_requantizes_the_sum_alike(bits):
    torch.manual_seed(0)
    weight, bias, delta = torch.randn(16, 64), torch.randn(16), torch.randn(16, 64)
    layer = Q4Linear.from_weight(weight, bias, group_size=32, bits=bits)
    layer.compute = "exact"
    merged = Q4Backend().merge(layer, delta)
    assert (merged.bits, merged.group_size, merged.compute) == (bits, 32, "exact")
    assert torch.equal(merged.bias, bias)
    want = layer.dequantize() + delta
    assert (merged.dequantize() - want).norm() < (0.12 if bits == 4 else 0.01) * want.norm()


def test_the_description_and_size_name_the_layers_bits_and_group_size():
    backend = Q4Backend()
    for bits, group_size, size in ((4, 64, 4.5), (8, 32, 9.0)):
        layer = Q4Linear.from_weight(torch.randn(8, 128), group_size=group_size, bits=bits)
        assert backend.describe(layer) == {"backend": "q4", "bits": bits, "group_size": group_size}
        assert backend.bits_per_weight(layer) == size and layer.group_size == group_size


@torch.no_grad()
def test_fast_computes_on_bfloat16_operands_where_the_cpu_has_them():
    """``fast`` is ``exact`` but for the bfloat16 rounding of the operands, on a CPU with native bfloat16 dot products
    only (elsewhere the two are one computation)."""
    from lordba.kernels.q4 import native_bfloat16

    torch.manual_seed(0)
    layer = Q4Linear.from_weight(torch.randn(24, 96), torch.randn(24), group_size=32)
    x = torch.randn(GEMM_MIN_TOKENS, 96)
    layer.compute = "exact"
    exact = layer(x)
    layer.compute = "fast"
    fast = layer(x)
    assert torch.equal(fast, exact) != native_bfloat16()
    assert (fast - exact).norm() <= 1e-2 * exact.norm()
