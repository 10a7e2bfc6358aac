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
        get_codec("int3")


def test_int4_codes_are_the_nearest_grid_codes_and_reach_127():
    import numpy as np

    from lordba.core.scales import INT4_LEVELS

    codec = get_codec("int4")
    g = torch.Generator().manual_seed(5)
    b, m, a = torch.randn(301, generator=g), torch.rand(7, generator=g) + 0.1, torch.randn(33, generator=g)
    qb, qm, qa = codec.encode(b, m, a)
    grid = np.array(sorted({s * v for v in INT4_LEVELS for s in (1, -1)}), dtype=np.float64)
    for v, q in ((b, qb), (a, qa)):
        x = 127 * v.double().numpy() / np.abs(v.double().numpy()).max()
        nearest = grid[np.abs(x[:, None] - grid[None]).argmin(1)]
        assert np.array_equal(q.numpy().astype(np.float64), nearest)
        assert int(q.abs().max()) == 127
    assert torch.allclose(qm, m * b.abs().max() * a.abs().max())


def test_int4_nibbles_match_an_independent_packer_and_round_trip():
    import numpy as np

    from lordba.core.scales import INT4_LEVELS, pack_nibbles, unpack_nibbles

    codes = torch.tensor([127, -127, 0, 18, -36, 54, -73, 91, -109], dtype=torch.int8)  # odd: one padding nibble
    index = {v: k for k, v in enumerate(INT4_LEVELS)}
    k = np.array([index[abs(int(c))] * (1 if c >= 0 else -1) for c in codes], dtype=np.int64)
    nibbles = np.append(k & 0xF, 0)
    expected = ((nibbles[0::2] << 4) | nibbles[1::2]).astype(np.uint8)
    packed = pack_nibbles(codes)
    assert packed.numpy().tobytes() == expected.tobytes()
    assert torch.equal(unpack_nibbles(packed)[: len(codes)], codes)
    assert int(unpack_nibbles(torch.tensor([0x80], dtype=torch.uint8))[0]) == -128  # index -8: invalid
    with pytest.raises(ValueError, match="outside the int4"):
        pack_nibbles(torch.tensor([100], dtype=torch.int8))


def test_int4_gradients_pass_straight_through():
    codec = get_codec("int4")
    b = torch.tensor([0.3, -1.0, 0.55], requires_grad=True)
    fb, _, _ = codec.fake_quant(b, torch.ones(2), torch.ones(3))
    assert set((fb * 127).round().abs().tolist()) <= {36.0, 127.0, 73.0}
    (fb * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    # rounding passes the gradient straight through: the same gradient as int8's (and as no rounding)
    plain = b.detach().clone().requires_grad_(True)
    ((plain / plain.abs().amax()) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(b.grad, plain.grad) and b.grad.abs().sum() > 0


def test_int4_conversion_returns_exactly_what_the_codec_stores():
    """PTQ knows the format: the factors it returns are int4 codes (m refitted after rounding), so a
    layer initialised with them reproduces the reported error."""
    from lordba.convert import convert_factors

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(8, 48, generator=g), torch.randn(40, 8, generator=g)
    res = convert_factors(A, B, 8, scale_dtype="int4")
    codec = get_codec("int4")
    for x, y in zip(
        codec.decode(*codec.encode(res.scale_in, res.scale_mid, res.scale_out)),
        (res.scale_in, res.scale_mid, res.scale_out),
    ):
        assert torch.equal(x, y.float())
    dense = (B @ A).double()
    err = float((res.delta_weight().double() - dense).norm() / dense.norm())
    assert err == pytest.approx(res.rel_error, rel=1e-4)
    assert res.rel_error < convert_factors(A, B, 8, scale_dtype="int4").rel_error_init + 0.05


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("where", ["b", "a"])
def test_code_formats_keep_a_nan_scale_visible(name, where):
    """A NaN in ``b`` or ``a`` (a diverged run) must not be encoded as code 0 beside finite stored
    tensors: the save's finiteness check would pass and the file would hold another adapter than the
    one that ran (whose forward is NaN). It reaches ``scale_mid``, which saves refuse."""
    codec = get_codec(name)
    b, m, a = torch.ones(6), torch.ones(2), torch.linspace(-1.0, 1.0, 4)
    (b if where == "b" else a)[1] = float("nan")
    stored = codec.encode(b, m, a)
    assert not torch.isfinite(stored[1]).all()
    assert not torch.isfinite(torch.stack([v.sum() for v in codec.decode(*stored)])).all()
    assert not torch.isfinite(torch.stack([v.sum() for v in codec.fake_quant(b, m, a)])).all()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_code_formats_encode_extreme_scales_without_overflow(name):
    """``127 · b`` overflowed float32 for ``|b|`` above ~2.7e36: the largest entries became NaN codes, cast to 0, and
    the saved adapter silently lost its largest scales. The codes are those of the same vector scaled down."""
    codec = get_codec(name)
    b, m, a = torch.tensor([3e36, 1e36, -3e36, 0.0]), torch.tensor([1e-36, 2e-36]), torch.tensor([3e37, -1e37])
    stored = codec.encode(b, m, a)
    small = codec.encode(b * 2.0**-120, m, a * 2.0**-120)
    assert torch.equal(stored[0], small[0]) and torch.equal(stored[2], small[2])
    assert stored[0].tolist()[0] == 127 and stored[0].tolist()[2] == -127 and stored[2].tolist()[0] == 127
    assert torch.isfinite(stored[1]).all()
    decoded = torch.einsum("i,k,j->ikj", *reversed(codec.decode(*stored)))
    exact = torch.einsum("i,k,j->ikj", a.double(), m.double(), b.double())
    assert ((decoded.double() - exact).norm() / exact.norm()) < 0.1
    for x, y in zip(codec.fake_quant(b, m, a), codec.decode(*stored)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_float_formats_pass_the_float32_gradient_straight_through(name):
    """The cast to the stored dtype is the forward's rounding only: the gradient reaching the float32
    parameters is the float32 one (a cast's own backward rounded it to the stored dtype: float16
    flushed gradients below ~6e-8 to zero and made those above 65504 infinite; bfloat16 kept 8 bits)."""
    codec = get_codec(name)
    b, m, a = (torch.tensor([0.3, -1.0, 0.55], requires_grad=True) for _ in range(3))
    weights = torch.tensor([1e-9, 1.0 + 2**-20, 1e5])
    for v in codec.fake_quant(b, m, a):
        (v * weights).sum().backward()
    for p in (b, m, a):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, weights)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_code_formats_carry_the_gradient_of_m_and_of_both_peaks(name):
    """``m̃ = m · max|b| · max|a|``: its gradient reaches ``m`` (scaled by both peaks) and the two peak entries."""
    codec = get_codec(name)
    b = torch.tensor([0.5, -2.0, 1.0], requires_grad=True)
    m = torch.tensor([1.5, -0.25], requires_grad=True)
    a = torch.tensor([3.0, 0.75], requires_grad=True)
    _, fm, _ = codec.fake_quant(b, m, a)
    torch.testing.assert_close(fm, torch.tensor([9.0, -1.5]), rtol=0, atol=0)
    (fm * torch.tensor([1.0, 2.0])).sum().backward()
    torch.testing.assert_close(m.grad, torch.tensor([6.0, 12.0]), rtol=0, atol=0)
    assert b.grad[1] != 0 and a.grad[0] != 0


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_code_formats_keep_an_all_zero_input_vector_finite(name):
    """``b = 0`` (every input channel off) must encode to zero codes and leave ``m̃ = m · max|a|``, and the
    training forward must stay finite (0 / 0 would put NaN in every output) with a gradient reaching ``b``."""
    codec = get_codec(name)
    b, m, a = torch.zeros(5, requires_grad=True), torch.tensor([2.0, -1.0]), torch.tensor([0.5, -4.0, 1.0])
    qb, qm, _ = codec.encode(b, m, a)
    assert torch.equal(qb, torch.zeros(5, dtype=torch.int8))
    torch.testing.assert_close(qm, torch.tensor([8.0, -4.0]), rtol=0, atol=0)
    fb, fm, fa = codec.fake_quant(b, m, a)
    assert torch.equal(fb, torch.zeros(5)) and torch.isfinite(fm).all() and torch.isfinite(fa).all()
    (fb * torch.arange(1.0, 6.0)).sum().backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_int4_ties_round_to_the_larger_magnitude():
    """A value exactly halfway between two int4 codes (127·v/max|v| = 9: between 0 and 18; 27: between 18 and
    36) takes the code of larger magnitude, on both signs, in the stored codes and in the training forward."""
    codec = get_codec("int4")
    b = torch.tensor([9.0, -9.0, 27.0, -27.0, 127.0])
    qb, _, _ = codec.encode(b, torch.ones(1), torch.ones(1))
    assert qb.tolist() == [18, -18, 36, -36, 127]
    fb, _, _ = codec.fake_quant(b, torch.ones(1), torch.ones(1))
    assert (fb * 127).round().tolist() == [18.0, -18.0, 36.0, -36.0, 127.0]
