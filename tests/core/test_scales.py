import pytest
import torch

from lordba import ConfigError
from lordba.core.scales import SCALE_DTYPES, get_codec


@pytest.mark.parametrize("name", SCALE_DTYPES)
def test_forward_scales_are_exactly_the_stored_ones(name):
    codec = get_codec(name)
    g = torch.Generator().manual_seed(0)
    b, m, a = torch.randn(37, generator=g), torch.rand(5, generator=g) + 0.1, torch.randn(11, generator=g) * 1e-3
    fq = codec.fake_quant(b, m, a)
    stored = codec.encode(b, m, a)
    assert tuple(t.dtype for t in stored) == codec.stored_dtypes
    decoded = codec.decode(*stored)
    for x, y in zip(fq, decoded):
        assert torch.equal(x, y)
    # idempotent: loading a file and re-encoding gives the same stored tensors
    for x, y in zip(codec.encode(*decoded), stored):
        assert torch.equal(x, y)
    for x, y in zip(codec.fake_quant(*decoded), decoded):
        assert torch.equal(x, y)


def test_int8_keeps_the_product_and_codes_reach_127():
    codec = get_codec("int8")
    g = torch.Generator().manual_seed(3)
    b, m, a = torch.rand(64, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5, torch.rand(32, generator=g) + 0.5
    qb, qm, qa = codec.encode(b, m, a)
    assert qb.abs().max() == 127 and qa.abs().max() == 127 and qm.dtype == torch.float32
    db, dm, da = codec.decode(qb, qm, qa)
    exact = torch.einsum("i,k,j->ikj", a, m, b)
    approx = torch.einsum("i,k,j->ikj", da, dm, db)
    assert ((approx - exact).norm() / exact.norm()) < 0.01


@pytest.mark.parametrize("name", SCALE_DTYPES)
def test_cold_start_a_equals_zero_still_gets_gradient_through_the_branch(name):
    """a = 0 must not zero m as well (the int8 gauge), or training could never start."""
    from lordba.core.autograd import sign_branch

    codec = get_codec(name)
    b, m, a = torch.ones(6, requires_grad=True), torch.ones(2, requires_grad=True), torch.zeros(4, requires_grad=True)
    signs_A, signs_B = torch.ones(2, 6), torch.ones(4, 2)
    out = sign_branch(torch.randn(3, 6), signs_A, signs_B, *codec.fake_quant(b, m, a), 1.0)
    assert torch.equal(out, torch.zeros(3, 4))
    (out * torch.randn(3, 4)).sum().backward()
    assert a.grad.abs().sum() > 0


def test_int8_zero_vector_and_gradients_pass_straight_through():
    codec = get_codec("int8")
    b = torch.ones(4, requires_grad=True)
    m = torch.ones(2, requires_grad=True)
    a = torch.zeros(3, requires_grad=True)  # the cold start
    fb, fm, fa = codec.fake_quant(b, m, a)
    assert torch.equal(fa, torch.zeros(3))
    (fb.sum() + fm.sum() + (fa * torch.arange(3.0)).sum()).backward()
    assert torch.allclose(a.grad, torch.arange(3.0) * 1.0)


def test_unknown_codec():
    with pytest.raises(ConfigError, match="scale_dtype"):
        get_codec("int4")
