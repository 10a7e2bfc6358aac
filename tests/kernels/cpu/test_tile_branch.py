"""A dense base's prompt branch on the tile unit (``lordba::linear_branch`` with ``tile_A`` / ``tile_B``,
prefill.cpp's ``add_branch``) and the packing both it and ``lordba::q4_branch`` read (``lordba::tile_pack``)."""

import os
import sys

import pytest
import torch

from lordba import kernels
from lordba.core.packing import pack_signs
from lordba.kernels.cpu import cpu_flags
from lordba.kernels.q4 import amx_prefill_available
from lordba.quant.backend import tile_factors

pytestmark = pytest.mark.skipif(not kernels.cpu_available(), reason="no C++ compiler: the fallback is tested elsewhere")
needs_amx = pytest.mark.skipif(not amx_prefill_available(), reason="the tile unit (AMX-BF16 on Linux) is not available")


def adapter(seed, in_f, out_f, r):
    g = torch.Generator().manual_seed(seed)
    s_a, s_b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
    b = torch.randint(-127, 128, (in_f,), generator=g, dtype=torch.int8)  # int8 codes, as stored
    m, a = torch.rand(r, generator=g) * 0.05, torch.randint(-127, 128, (out_f,), generator=g, dtype=torch.int8)
    return pack_signs(s_a), pack_signs(s_b), b, m, a


def bf16_branch(x, tensors, scaling):
    """The tile unit's arithmetic, in float64 from the rounded operands: x and A' in bfloat16, h summed and
    rounded to bfloat16, h B'^T summed (B' in bfloat16)."""
    folded_A, folded_B = torch.ops.lordba.q4_prefill_factors(*tensors, scaling)
    h = (x.bfloat16().double() @ folded_A.double().t()).bfloat16()
    return h.double() @ folded_B.double().t()


def test_tile_pack_lays_pairs_of_columns_in_words_by_blocks_of_16_rows():
    """Word ``(c * pairs + p) * 16 + j`` holds ``M[16 c + j, 2p]`` (low half) and ``M[16 c + j, 2p + 1]``;
    rows and columns past the matrix's are zero; ``pairs`` covers the columns in steps of 32."""
    M = (torch.arange(20 * 37, dtype=torch.float32).reshape(20, 37) + 1).bfloat16()
    packed = torch.ops.lordba.tile_pack(M)
    pairs = 32  # 37 columns: two steps of 32
    assert packed.dtype == torch.int32 and packed.numel() == 2 * pairs * 16
    bits = M.view(torch.int16).int() & 0xFFFF
    words = packed.view(2, pairs, 16)
    for c, p, j in [(0, 0, 0), (0, 5, 7), (1, 3, 3), (0, 18, 15), (1, 17, 2)]:
        row, col = 16 * c + j, 2 * p
        low = bits[row, col].item() if row < 20 and col < 37 else 0
        high = bits[row, col + 1].item() if row < 20 and col + 1 < 37 else 0
        assert words[c, p, j].item() & 0xFFFFFFFF == low | high << 16
    assert words[1, :, 4:].eq(0).all() and words[:, 19:].eq(0).all()
    with pytest.raises(RuntimeError, match="bfloat16 matrix"):
        torch.ops.lordba.tile_pack(M.float())


@needs_amx
@pytest.mark.parametrize(
    ("tokens", "in_f", "out_f", "r"),
    [(512, 576, 192, 16), (45, 40, 24, 8), (33, 37, 40, 16), (70, 96, 200, 48), (17, 64, 13, 5)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_prompt_branch_on_the_tile_unit_is_the_bfloat16_arithmetic(tokens, in_f, out_f, r, bias):
    """More tokens than the sign path takes: ``at::linear`` (float32, bit for bit ``F.linear``) plus the branch
    in bfloat16 with float32 sums — a partial last block of 32 tokens, widths that are not a multiple of 32
    inputs or 16 outputs, ranks of one, two and three blocks of 16. Its difference from the exact float32
    branch is bfloat16's rounding (under 1% of the branch), and the same bits on one and two threads."""
    g = torch.Generator().manual_seed(tokens + r)
    x = torch.randn(2, tokens, in_f, generator=g)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    bias_t = torch.randn(out_f, generator=g) if bias else None
    tensors = adapter(r, in_f, out_f, r)
    tiles = tile_factors(tensors, 0.7)
    base = torch.nn.functional.linear(x, weight, bias_t)
    got = torch.ops.lordba.linear_branch(x, weight, bias_t, *tensors, 0.7, 4, *tiles)
    want = base.double() + bf16_branch(x, tensors, 0.7)
    exact = torch.ops.lordba.linear_branch(x, weight, bias_t, *tensors, 0.7, 4)
    branch = (exact - base).double()
    assert (got.double() - want).norm() <= 1e-3 * branch.norm()  # h's rounding ties may fall either way
    assert (got - exact).double().norm() <= 1e-2 * branch.norm() and not torch.equal(got, exact)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if saved > 1 else 2)
        assert torch.equal(torch.ops.lordba.linear_branch(x, weight, bias_t, *tensors, 0.7, 4, *tiles), got)
    finally:
        torch.set_num_threads(saved)


@needs_amx
def test_few_tokens_other_dtypes_and_bad_tiles():
    """Up to the dispatch limit (the sign path), below 16 tokens (the unpack mode's limit is -1: one token
    stays float32 in every mode) and for bfloat16 inputs the tiles are ignored (the op's own branch, bit
    for bit); tiles of another adapter's shape are refused, naming them."""
    tensors = adapter(3, 40, 24, 8)
    tiles = tile_factors(tensors, 0.5)
    weight = torch.randn(24, 40)
    cases = ((torch.randn(3, 40), 4), (torch.randn(1, 40), -1), (torch.randn(15, 40), -1))
    for x, limit in (*cases, (torch.randn(2, 9, 40).bfloat16(), 4)):
        w = weight.to(x.dtype)
        want = torch.ops.lordba.linear_branch(x, w, None, *tensors, 0.5, limit)
        assert torch.equal(torch.ops.lordba.linear_branch(x, w, None, *tensors, 0.5, limit, *tiles), want)
    other = tile_factors(adapter(3, 40, 48, 8), 0.5)
    with pytest.raises(RuntimeError, match="tile_A / tile_B must be tile_pack"):
        torch.ops.lordba.linear_branch(torch.randn(20, 40), weight, None, *tensors, 0.5, 4, tiles[0], other[1])


def test_the_tile_unit_runs_where_the_cpu_has_it():
    """Not silently the float32 path: on Linux with AMX-BF16 the tile unit is granted and used (by a build
    for this machine: one for another ``-march``, such as an AVX2 build, has no tile code)."""
    native = os.environ.get("LORDBA_CPU_ARCH", "native") == "native"
    if "amx_bf16" in cpu_flags().split() and sys.platform == "linux" and native:
        assert amx_prefill_available()


@needs_amx
def test_q4_branch_reads_a_kept_packed_A_bit_for_bit():
    """``q4_branch``'s ``tile_A`` (``tile_pack(folded_A)``, kept by the layer) gives the bits of packing per
    call; one of another shape is refused."""
    from lordba.quant.q4 import Q4Linear

    layer = Q4Linear.from_weight(torch.randn(48, 96), None, group_size=32)
    tensors = adapter(5, 96, 48, 8)
    folded_A, folded_B = torch.ops.lordba.q4_prefill_factors(*tensors, 0.5)
    x = torch.randn(40, 96)
    args = (x, layer.qweight, layer.scale, layer.minus, 96, 16, 4, True, False, None, *tensors, 0.5, 4)
    want = torch.ops.lordba.q4_branch(*args, folded_A, folded_B)
    kept = torch.ops.lordba.tile_pack(folded_A)
    assert torch.equal(torch.ops.lordba.q4_branch(*args, folded_A, folded_B, kept), want)
    other = torch.ops.lordba.tile_pack((folded_A.float() * 3).bfloat16())  # read, not packed again from folded_A
    assert not torch.equal(torch.ops.lordba.q4_branch(*args, folded_A, folded_B, other), want)
    with pytest.raises(RuntimeError, match="tile_A must be tile_pack"):
        torch.ops.lordba.q4_branch(*args, folded_A, folded_B, torch.ops.lordba.tile_pack(folded_A[:, :64]))
