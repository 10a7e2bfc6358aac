"""RowBranch (kernels/cpu/row_branch.cpp): the branch added inside a one-token GEMV's loop (``q4_branch``,
``linear_branch``) against the two calls it replaces (the layer, then the ``branch`` op) on inputs whose sums
are not finite."""

import pytest
import torch

from lordba import kernels
from lordba.core.packing import pack_signs
from lordba.kernels.q4 import pack_codes, q4_linear

pytestmark = pytest.mark.skipif(not kernels.cpu_available(), reason="no C++ compiler: the fallback is tested elsewhere")

SIGN = 1 << 62
IN, OUT, R = 64, 37, 13


def adapter(column_sign: float) -> tuple[torch.Tensor, ...]:
    """Packed signs (S_A's columns 5 and 6 of ``column_sign`` and its opposite, S_B all +1) and scales, b = 1
    on those columns (so z = x there), m > 0."""
    g = torch.Generator().manual_seed(3)
    lat_A = torch.randn(R, IN, generator=g)
    lat_A[:, 5], lat_A[:, 6] = column_sign, -column_sign
    b = torch.rand(IN, generator=g) + 0.5
    b[5:7] = 1.0
    m, a = torch.rand(R, generator=g) + 0.1, torch.rand(OUT, generator=g) + 0.1
    return pack_signs(lat_A), pack_signs(torch.ones(OUT, R)), b, m, a


def token(kind: str) -> torch.Tensor:
    """One float32 token: input 5 infinite (``inf`` / ``-inf``), or inputs 5 and 6 both 2e38 (``overflow``:
    every z finite, Σz infinite)."""
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(4))
    if kind == "overflow":
        x[0, 5:7] = 2e38
    else:
        x[0, 5] = float(kind)
    return x


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same NaNs and infinities, the finite outputs equal up to float32 rounding."""
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[want.isinf()], want[want.isinf()])
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["inf", "-inf", "overflow"])
@pytest.mark.parametrize("column_sign", [1.0, -1.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_token_with_sums_that_are_not_finite_is_the_layer_then_the_branch(kind, column_sign, threads):
    """An infinite input, or finite inputs whose Σz overflows: the one-token fused calls give the two calls'
    infinities and finite values (the branch's stage 1 sums ±z where Σz is not finite), not NaN everywhere.
    The AVX-512 build's RowBranch computed h = 2·Σ_{bit=1} z − Σz, inf − inf = NaN, where the ``branch`` op
    (since e90e9ff) and the float64 reference give ±inf or a finite value."""
    x, tensors = token(kind), adapter(column_sign)
    g = torch.Generator().manual_seed(5)
    weight = (torch.rand(OUT, IN, generator=g) + 0.1) * 1e-3  # positive: the base is +inf for x_5 = +inf
    codes = torch.ones(OUT, IN, dtype=torch.uint8)  # the q4 base's weights: all 1e-3
    if kind == "overflow":  # a finite base (the branch's huge terms are what is tested)
        weight[:, 5:7], codes[:, 5:7] = 0.0, 0
    qweight = pack_codes(codes, 4)
    scale, minus = torch.full((OUT, IN // 32), 1e-3).half(), torch.zeros(OUT, IN // 32).half()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = torch.ops.lordba.linear_branch(x, weight, None, *tensors, 0.5, SIGN)
        assert_same(dense, torch.ops.lordba.branch(x, *tensors, 0.5, SIGN, torch.nn.functional.linear(x, weight)))
        q4 = torch.ops.lordba.q4_branch(x, qweight, scale, minus, IN, 16, 4, False, False, None, *tensors, 0.5, SIGN)
        assert_same(q4, torch.ops.lordba.branch(x, *tensors, 0.5, SIGN, q4_linear(x, qweight, scale, minus, IN)))
        branch = torch.ops.lordba.branch(x, *tensors, 0.5, SIGN, None)
        assert not branch.isnan().all()  # the case is one the masked sums got wrong
    finally:
        torch.set_num_threads(saved)
