"""torch.ops.lordba.branch (the compiled CPU kernels) against an independent float64 reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lordba import kernels
from lordba.core.packing import pack_signs

pytestmark = pytest.mark.skipif(not kernels.cpu_available(), reason="no C++ compiler: the fallback is tested elsewhere")

SIGN, UNPACK = 1 << 62, -1


def case(seed, lead, in_f, out_f, r, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    lat_A = torch.randn(r, in_f, generator=g)
    lat_B = torch.randn(out_f, r, generator=g)
    b = torch.rand(in_f, generator=g) + 0.5
    m = torch.randn(r, generator=g)
    a = torch.randn(out_f, generator=g)
    return x, lat_A, lat_B, b, m, a


def expected(x, lat_A, lat_B, b, m, a, s):
    S_A = torch.where(lat_A >= 0, 1.0, -1.0).double()
    S_B = torch.where(lat_B >= 0, 1.0, -1.0).double()
    return (((x.double() * b.double()) @ S_A.t()) * m.double()) @ S_B.t() * (a.double() * s)


def run(x, lat_A, lat_B, b, m, a, s, limit, base=None):
    return torch.ops.lordba.branch(x, pack_signs(lat_A), pack_signs(lat_B), b, m, a, s, limit, base)


def assert_near(got, inputs, s, dtype):
    # sign sums of n terms: error relative to the scale of the terms, looser for 8-bit mantissas
    # (bfloat16: worst 2.08e-2 over 3,000 random cases of the hypothesis test's space, the same with
    # the kernels of 0e086ec, so 2e-2 failed about once in 3,000 draws). The scale is the larger of the
    # output and the output with every term's magnitude added: where the r terms of S_B (m ⊙ h) cancel
    # (seed 216, in 1, out 2, r 2: m = [1.07, -1.10]) bfloat16's roundings of the terms are 17% of the
    # small output, as in any float sum.
    x, lat_A, lat_B, b, m, a = inputs
    want = expected(*inputs, s)
    terms = expected(x.abs(), torch.ones_like(lat_A), torch.ones_like(lat_B), b.abs(), m.abs(), a.abs(), s)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    scale = max(want.abs().max().item(), terms.abs().max().item()) + 1e-6
    assert (got.double() - want).abs().max().item() <= tol * scale


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lead=st.sampled_from([(1,), (3,), (17,), (2, 5), (1, 1, 4)]),
    in_f=st.integers(1, 70),
    out_f=st.integers(1, 50),
    r=st.integers(1, 20),
    limit=st.sampled_from([SIGN, UNPACK]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_both_paths_match_the_reference_on_any_shape(seed, lead, in_f, out_f, r, limit, dtype):
    x, lat_A, lat_B, b, m, a = case(seed, lead, in_f, out_f, r, dtype)
    got = run(x, lat_A, lat_B, b, m, a, 0.75, limit)
    assert got.shape == (*lead, out_f) and got.dtype == dtype
    assert_near(got, (x, lat_A, lat_B, b, m, a), 0.75, dtype)


@pytest.mark.parametrize("in_f,out_f,r", [(576, 1536, 16), (1536, 576, 64), (576, 192, 8), (96, 130, 32), (40, 52, 24)])
@pytest.mark.parametrize("limit", [SIGN, UNPACK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_shapes_every_vector_path(in_f, out_f, r, limit, dtype):
    # ranks 8/16/32/64 take the 1/2/4/8-byte row loads of the AVX-512 stage 2, 24 the scalar one
    for tokens in (1, 2, 5, 9):
        x, lat_A, lat_B, b, m, a = case(tokens, (tokens,), in_f, out_f, r, dtype)
        assert_near(run(x, lat_A, lat_B, b, m, a, 2.0, limit), (x, lat_A, lat_B, b, m, a), 2.0, dtype)


@pytest.mark.parametrize("limit", [SIGN, UNPACK])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_base_add(limit, base_dtype):
    x, lat_A, lat_B, b, m, a = case(3, (2, 3), 45, 23, 5)
    base = torch.randn(2, 3, 23).to(base_dtype)
    got = run(x, lat_A, lat_B, b, m, a, 0.5, limit, base)
    assert got.dtype == base_dtype and got.shape == base.shape
    want = base.double() + expected(x, lat_A, lat_B, b, m, a, 0.5)
    tol = 1e-5 if base_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if base_dtype == torch.float32 and limit == SIGN:  # one rounding: exactly base + delta
        assert torch.equal(got, base + run(x, lat_A, lat_B, b, m, a, 0.5, limit))


@pytest.mark.parametrize("limit", [SIGN, UNPACK])
def test_int8_codes_compute_exactly_their_float32_values(limit):
    """Every int8 code c means c / 127 (docs/format.md): the kernel's decoding of b and a (no
    division on AVX-512) must give the float32 division's values for all 256 codes, so a compact
    adapter's output is bit for bit its decoded float32 form's."""
    codes = torch.arange(-128, 128, dtype=torch.int8)
    x, lat_A, lat_B, _, m, _ = case(4, (3,), 256, 256, 8)
    b, a = codes, codes.flip(0)
    base = torch.randn(3, 256)
    got = run(x, lat_A, lat_B, b, m, a, 0.5, limit, base)
    assert torch.equal(got, run(x, lat_A, lat_B, b.float() / 127, m, a.float() / 127, 0.5, limit, base))


def test_the_op_leaves_its_base_argument_unchanged():
    x, lat_A, lat_B, b, m, a = case(6, (1, 1), 64, 48, 8)
    base = torch.randn(1, 1, 48)
    kept = base.clone()
    for limit in (SIGN, UNPACK):
        got = run(x, lat_A, lat_B, b, m, a, 1.0, limit, base)
        assert torch.equal(base, kept) and got.data_ptr() != base.data_ptr()
    zero_in = run(x[..., :0], lat_A[:, :0], lat_B, b[:0], m, a, 1.0, SIGN, base)
    assert torch.equal(zero_in, base) and zero_in.data_ptr() != base.data_ptr()  # nothing to add


def test_non_contiguous_input_zero_tokens_and_determinism():
    x, lat_A, lat_B, b, m, a = case(1, (6, 40), 33, 21, 7)
    xs = x.reshape(40, 6, 33)[:, 1]
    assert not xs.is_contiguous()
    for limit in (SIGN, UNPACK):
        got = run(xs, lat_A, lat_B, b, m, a, 1.0, limit)
        assert torch.equal(got, run(xs.contiguous(), lat_A, lat_B, b, m, a, 1.0, limit))
        assert torch.equal(got, run(xs, lat_A, lat_B, b, m, a, 1.0, limit))  # deterministic
        empty = run(x[:0], lat_A, lat_B, b, m, a, 1.0, limit)
        assert empty.shape == (0, 40, 21)


@pytest.mark.parametrize("limit", [SIGN, UNPACK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("r", [1, 8, 13])
def test_an_infinite_input_gives_the_references_infinities_and_nans(limit, dtype, tokens, r):
    """An infinite activation (one input column +inf or -inf, one token of them finite): where the reference's
    sums hold one sign of infinity (S_A's column of that input of one sign, S_B all +1) the output is that
    infinity, else NaN, on both paths and every build. The AVX-512 sign path's sums, 2·Σ_{bit=1} z − Σz, gave
    inf − inf = NaN where the reference gives ±inf (the portable and AVX2 builds sum ±z, as the reference)."""
    x, lat_A, lat_B, b, m, a = case(9, (tokens,), 37, 21, r, dtype)
    m = m.abs() + 0.1
    for column_sign in (1.0, -1.0):
        for aligned in (True, False):
            lat_A = lat_A.clone()
            lat_A[:, 5] = column_sign
            signs_B = torch.ones_like(lat_B) if aligned else lat_B
            xi = x.clone()
            xi[:, 5] = torch.tensor([float("inf"), -float("inf")] * tokens)[:tokens].to(dtype)
            xi[-1, 5] = 1.0 if tokens > 1 else xi[-1, 5]  # a finite token beside them
            want = expected(xi, lat_A, signs_B, b, m, a, 0.5)
            got = run(xi, lat_A, signs_B, b, m, a, 0.5, limit).double()
            assert torch.equal(got.isnan(), want.isnan()), (column_sign, aligned)
            assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[want.isinf()], want[want.isinf()])
            assert want.isinf().any() or not aligned


def test_threads_do_not_change_results():
    x, lat_A, lat_B, b, m, a = case(2, (3,), 2048, 3000, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, lat_A, lat_B, b, m, a, 1.0, SIGN)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(run(x, lat_A, lat_B, b, m, a, 1.0, SIGN), one)
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_are_refused():
    x, lat_A, lat_B, b, m, a = case(0, (2,), 16, 8, 4)
    sa, sb = pack_signs(lat_A), pack_signs(lat_B)
    with pytest.raises(RuntimeError, match="last dimension"):
        torch.ops.lordba.branch(x[:, :15], sa, sb, b, m, a, 1.0, SIGN, None)
    with pytest.raises(RuntimeError, match="packed sign sizes"):
        torch.ops.lordba.branch(x, sa[:-1], sb, b, m, a, 1.0, SIGN, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lordba.branch(x, sa, sb, b.double(), m, a, 1.0, SIGN, None)
    with pytest.raises(RuntimeError, match="base must have"):
        torch.ops.lordba.branch(x, sa, sb, b, m, a, 1.0, SIGN, torch.zeros(2, 9))


@pytest.mark.parametrize("limit", [SIGN, UNPACK])
@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_branch_is_the_linear_layer_then_the_branch_bit_for_bit(limit, tokens, bias, dtype):
    """``lordba::linear_branch`` (a dense layer and its adapter in one call, decode on an unquantized
    base) adds the branch into ``at::linear``'s fresh output for more than one token: exactly
    ``F.linear`` then ``branch`` with it as the base, on both branch paths."""
    x, lat_A, lat_B, b, m, a = case(7, (2, tokens), 40, 24, 8, dtype)
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(24, 40, generator=g).to(dtype)
    bias_t = torch.randn(24, generator=g).to(dtype) if bias else None
    sa, sb = pack_signs(lat_A), pack_signs(lat_B)
    got = torch.ops.lordba.linear_branch(x, weight, bias_t, sa, sb, b, m, a, 0.5, limit)
    base = torch.nn.functional.linear(x, weight, bias_t)
    assert got.dtype == dtype and got.shape == base.shape
    assert torch.equal(got, torch.ops.lordba.branch(x, sa, sb, b, m, a, 0.5, limit, base))


@pytest.mark.parametrize("shape", [(1, 40, 24), (1, 1, 576, 192), (1, 37, 23), (1, 16, 64), (1, 1536, 13)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_branch_one_float32_token_is_the_layer_then_the_branch_up_to_rounding(shape, bias, threads):
    """One float32 token (decode on a float32 base): the op computes the layer's GEMV itself and adds the
    branch block by block (AVX-512 builds), so the sums run in another order than ``F.linear``'s — equal
    to the layer then the branch up to float32 rounding, on every width (tails of 16 inputs, of 4 and 16
    rows) and thread count; a weight that is not contiguous takes the two-call path, bit for bit."""
    *lead, in_f, out_f = shape
    x, lat_A, lat_B, b, m, a = case(11, tuple(lead), in_f, out_f, 8)
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    bias_t = torch.randn(out_f, generator=g) if bias else None
    sa, sb = pack_signs(lat_A), pack_signs(lat_B)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.lordba.linear_branch(x, weight, bias_t, sa, sb, b, m, a, 0.5, SIGN)
        want = torch.ops.lordba.branch(x, sa, sb, b, m, a, 0.5, SIGN, torch.nn.functional.linear(x, weight, bias_t))
        dense = torch.nn.functional.linear(x.double(), weight.double(), None if bias_t is None else bias_t.double())
        exact = dense + expected(x, lat_A, lat_B, b, m, a, 0.5)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got.double() - exact).abs().max() <= 4 * (want.double() - exact).abs().max() + 1e-5
        strided = weight.t().contiguous().t()  # the same values, not contiguous: the two calls
        two_calls = torch.ops.lordba.branch(
            x, sa, sb, b, m, a, 0.5, SIGN, torch.nn.functional.linear(x, strided, bias_t)
        )
        assert torch.equal(torch.ops.lordba.linear_branch(x, strided, bias_t, sa, sb, b, m, a, 0.5, SIGN), two_calls)
    finally:
        torch.set_num_threads(before)


def test_linear_branch_refuses_an_input_of_another_width():
    x, lat_A, lat_B, b, m, a = case(9, (1, 1), 40, 24, 8)
    with pytest.raises(RuntimeError, match="x's last dimension must be the weight's in_features"):
        torch.ops.lordba.linear_branch(
            x, torch.randn(24, 41), None, pack_signs(lat_A), pack_signs(lat_B), b, m, a, 1.0, SIGN
        )
    with pytest.raises(RuntimeError, match="scale vectors"):  # the branch's own checks
        torch.ops.lordba.linear_branch(
            x, torch.randn(24, 40), None, pack_signs(lat_A), pack_signs(lat_B), b, m, a[:5], 1.0, SIGN
        )


_RANK_ZERO = """
import torch
from lordba import kernels
from lordba.quant.q4 import Q4Linear

kernels.cpu_available()
ops, e, m = torch.ops.lordba, torch.zeros(0, dtype=torch.uint8), torch.zeros(0)
b, a, w = torch.rand(64), torch.randn(32), torch.randn(32, 64)
q = Q4Linear.from_weight(w, None, 32, optimize=False)
base = (q.qweight, q.scale, q.minus, 64, 16, 4)
calls = {
    "branch": lambda x: ops.branch(x, e, e, b, m, a, 1.0, 16, None),
    "branch unpack": lambda x: ops.branch(x, e, e, b, m, a, 1.0, -1, torch.zeros(*x.shape[:-1], 32)),
    "branch_rows": lambda x: ops.branch_rows(
        x, torch.zeros(len(x), dtype=torch.long), [e], [e], [b], [m], [a], [1.0], [16], torch.zeros(len(x), 32)
    ),
    "q4_branch": lambda x: ops.q4_branch(x, *base, False, False, None, e, e, b, m, a, 1.0, -1),
    "q4_branch bf16": lambda x: ops.q4_branch(x, *base, True, False, None, e, e, b, m, a, 1.0, -1),
    "linear_branch": lambda x: ops.linear_branch(x, w, None, e, e, b, m, a, 1.0, -1, None, None),
    "q4_prefill_factors": lambda x: ops.q4_prefill_factors(e, e, b, m, a, 1.0),
}
for name, call in calls.items():
    for tokens in (1, 3, 20):
        try:
            call(torch.randn(tokens, 64))
        except RuntimeError as err:
            assert "rank" in str(err), (name, tokens, str(err))
        else:
            raise AssertionError(f"{name} with {tokens} tokens took an adapter of rank 0")
print("refused")
"""


def test_an_adapter_of_rank_zero_is_refused_not_a_crash():
    """A branch of rank 0 (empty ``m`` and signs) was an integer division by zero in the kernels: SIGFPE, the
    whole process gone, from every op that takes an adapter. Now each raises (run in a child process)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _RANK_ZERO], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "refused" in done.stdout, (done.returncode, done.stderr[-2000:])
