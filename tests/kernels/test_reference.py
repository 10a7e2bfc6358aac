"""The pure-PyTorch branches (kernels.reference) against an independent float64 computation, in every
dtype pairing of input and base output that a layer meets (a float32 input on a bfloat16 base and back)."""

import numpy as np
import pytest
import torch

from lordba.core.autograd import fold_factors
from lordba.core.packing import pack_signs
from lordba.kernels.reference import dense_branch, packed_branch


def _case(tokens, in_f=13, out_f=7, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, in_f, generator=g)
    S_A = torch.where(torch.randn(r, in_f, generator=g) >= 0, 1.0, -1.0)
    S_B = torch.where(torch.randn(out_f, r, generator=g) >= 0, 1.0, -1.0)
    b, m, a = torch.rand(in_f, generator=g) + 0.5, torch.randn(r, generator=g), torch.randn(out_f, generator=g)
    base = torch.randn(*tokens, out_f, generator=g)
    return x, S_A, S_B, b, m, a, base


def _expected(x, S_A, S_B, b, m, a, s, base):
    dw = s * np.diag(a.double()) @ S_B.double().numpy() @ np.diag(m.double()) @ S_A.double().numpy()
    out = x.double().numpy() @ (dw @ np.diag(b.double())).T
    return out if base is None else out + base.double().numpy()


@pytest.mark.parametrize("tokens", [(5,), (2, 3)])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_dtype", [None, torch.float32, torch.bfloat16])
def test_packed_and_dense_branches_match_float64_in_the_dtype_of_their_output(tokens, x_dtype, base_dtype):
    """Without a base the branch is in ``x``'s dtype; with one, ``base + branch`` in the base's dtype."""
    x, S_A, S_B, b, m, a, base = _case(tokens)
    x = x.to(x_dtype)
    base = None if base_dtype is None else base.to(base_dtype)
    want = _expected(x, S_A, S_B, b, m, a, 0.75, base)
    packed = packed_branch(x, pack_signs(S_A), pack_signs(S_B), b, m, a, 0.75, base)
    dense = dense_branch(x, *fold_factors(S_A, S_B, b, m, a, 0.75, dtype=x_dtype), base)
    out_dtype = x_dtype if base_dtype is None else base_dtype
    tol = 1e-5 if out_dtype == torch.float32 and x_dtype == torch.float32 else 0.1
    for got in (packed, dense):
        assert got.dtype == out_dtype and got.shape == (*tokens, 7)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)
