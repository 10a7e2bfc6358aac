"""``torch.ops.lordba.decode_attention`` (one query position per head group over a KV cache in
float32, float16 or bfloat16) against ``scaled_dot_product_attention`` in float64 on the same
(rounded) cache."""

import pytest
import torch
import torch.nn.functional as F

from lordba import kernels

pytestmark = pytest.mark.skipif(not kernels.cpu_available(), reason="no C++ compiler: SDPA is used instead")


def case(seed, B, H, G, S, D, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, G, D, generator=g)
    k = (torch.randn(B, H, S, D, generator=g) * 3).to(dtype)
    v = torch.randn(B, H, S, D, generator=g).to(dtype)
    return q, k, v


def reference(q, k, v, mask, scale):
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,G,S,D", [(1, 3, 3, 520, 64), (2, 2, 4, 300, 128), (1, 1, 1, 7, 48), (2, 1, 2, 1, 256)])
def test_equals_sdpa_on_the_same_cache(dtype, B, H, G, S, D):
    q, k, v = case(S + D, B, H, G, S, D, dtype)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(B, 1, 1, S, generator=g) > 0.3
    keep[..., 0] = True
    additive = torch.where(keep[:1], 0.0, -1e4) + torch.randn(1, 1, 1, S, generator=g)
    for mask in (keep, additive, None):
        got = torch.ops.lordba.decode_attention(q, k, v, mask, 0.125)
        assert got.dtype == torch.float32 and got.shape == q.shape
        torch.testing.assert_close(got.double(), reference(q, k, v, mask, 0.125), rtol=2e-5, atol=2e-5)


def test_masked_positions_are_never_read_and_a_fully_masked_row_gives_zeros():
    q, k, v = case(0, 1, 2, 3, 600, 64, torch.float16)
    keep = torch.zeros(1, 1, 1, 600, dtype=torch.bool)
    keep[..., 100:420] = True  # blocks of 256: one partly masked at each end, the last one fully
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[..., ~keep[0, 0, 0], :] = float("nan")
    poisoned_v[..., ~keep[0, 0, 0], :] = float("inf")
    got = torch.ops.lordba.decode_attention(q, poisoned_k, poisoned_v, keep, 0.1)
    assert torch.equal(got, torch.ops.lordba.decode_attention(q, k, v, keep, 0.1))
    none = torch.zeros_like(keep)
    assert torch.equal(torch.ops.lordba.decode_attention(q, k, v, none, 0.1), torch.zeros_like(q))


def test_threads_do_not_change_results():
    q, k, v = case(3, 2, 3, 3, 1000, 64, torch.float16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.lordba.decode_attention(q, k, v, None, 0.125)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(torch.ops.lordba.decode_attention(q, k, v, None, 0.125), one)
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_are_refused():
    q, k, v = case(0, 1, 2, 3, 10, 16, torch.float16)
    op = torch.ops.lordba.decode_attention
    with pytest.raises(RuntimeError, match="q must be float32"):
        op(q.half(), k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(q, k, v.float(), None, 1.0)
    with pytest.raises(RuntimeError, match=r"k must be \[B, H, S, D\]"):
        op(q, k[:, :1], v[:, :1], None, 1.0)
    with pytest.raises(RuntimeError, match="mask must be"):
        op(q, k, v, torch.ones(1, 1, 2, 10, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        op(q, k.double(), v.double(), None, 1.0)
