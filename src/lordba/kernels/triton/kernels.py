# ruff: noqa: ANN001, ANN201
"""Triton kernels of the packed branch (GPU; on CPU they run in Triton's interpreter, for tests).

Signs are read straight from the stored bit layout (row-major, MSB first): element ``(row, col)``
of an ``rows × cols`` sign matrix is bit ``7 - (p & 7)`` of byte ``p >> 3``, ``p = row·cols + col``;
padding lanes (``row ≥ rows`` or ``col ≥ cols``) get sign 0 so they never contribute.

* :func:`shrink` (stages 1-2): ``part[s, t, j] = Σ_{i in split s} S_A[j, i] · (b ⊙ x)[t, i]``, split
  over ``in`` so that a single token still fills the GPU; partial sums go to a float32 buffer and
  are added in a fixed order by :func:`expand` (deterministic: no atomics).
* :func:`expand` (stages 3-5): ``y = [base +] s · a ⊙ (S_B (m ⊙ Σ_s part[s]))``.
* :func:`unpack` (prefill): ``dst = ±col_scale[col] · (s · row_scale[row])``, i.e. the folded dense
  factors ``A' = S_A diag(b)`` and ``B' = s diag(a) S_B diag(m)`` for two cuBLAS matmuls.

All arithmetic is float32 with IEEE dots (no TF32), whatever the activation dtype; the output is
rounded once. The branch is memory-bound at the token counts these kernels serve, so this costs
little, and it is what Triton's interpreter computes correctly (its bfloat16 ``tl.dot`` is not).

No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations at
decoration time. Triton also decides when it is first imported whether functions are compiled or
interpreted (``TRITON_INTERPRET=1``), so this module is imported lazily, on the first call.
"""

import triton
import triton.language as tl


@triton.jit
def shrink(x_ptr, sa_ptr, b_ptr, part_ptr, T, IN, R, K_SPLIT, BT: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_j = tl.arange(0, RP)
    mask_t = offs_t < T
    mask_j = offs_j < R
    acc = tl.zeros((BT, RP), dtype=tl.float32)
    k_start = pid_s * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, IN)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < k_end
        xk = tl.load(
            x_ptr + offs_t[:, None].to(tl.int64) * IN + offs_k[None, :],
            mask=mask_t[:, None] & mask_k[None, :],
            other=0.0,
        )
        z = xk.to(tl.float32) * tl.load(b_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
        pos = offs_j[:, None] * IN + offs_k[None, :]
        m2 = mask_j[:, None] & mask_k[None, :]
        bit = (tl.load(sa_ptr + (pos >> 3), mask=m2, other=0).to(tl.int32) >> (7 - (pos & 7))) & 1
        sign = tl.where(m2, bit.to(tl.float32) * 2.0 - 1.0, 0.0)
        acc += tl.dot(z, tl.trans(sign), input_precision="ieee")
    dst = part_ptr + (pid_s * T + offs_t[:, None]).to(tl.int64) * RP + offs_j[None, :]
    tl.store(dst, acc, mask=mask_t[:, None])


@triton.jit
def expand(
    part_ptr,
    sb_ptr,
    m_ptr,
    a_ptr,
    base_ptr,
    y_ptr,
    T,
    OUT,
    R,
    SPLITS,
    scaling,
    HAS_BASE: tl.constexpr,
    BT: tl.constexpr,
    BO: tl.constexpr,
    RP: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_j = tl.arange(0, RP)
    mask_t = offs_t < T
    mask_o = offs_o < OUT
    mask_j = offs_j < R
    h = tl.zeros((BT, RP), dtype=tl.float32)
    for s in range(0, SPLITS):
        src = part_ptr + (s * T + offs_t[:, None]).to(tl.int64) * RP + offs_j[None, :]
        h += tl.load(src, mask=mask_t[:, None], other=0.0)
    h = h * tl.load(m_ptr + offs_j, mask=mask_j, other=0.0)[None, :]
    pos = offs_o[:, None] * R + offs_j[None, :]
    m2 = mask_o[:, None] & mask_j[None, :]
    bit = (tl.load(sb_ptr + (pos >> 3), mask=m2, other=0).to(tl.int32) >> (7 - (pos & 7))) & 1
    sign = tl.where(m2, bit.to(tl.float32) * 2.0 - 1.0, 0.0)
    acc = tl.dot(h, tl.trans(sign), input_precision="ieee")
    out = acc * (tl.load(a_ptr + offs_o, mask=mask_o, other=0.0) * scaling)[None, :]
    offs = offs_t[:, None].to(tl.int64) * OUT + offs_o[None, :]
    mask = mask_t[:, None] & mask_o[None, :]
    if HAS_BASE:
        out += tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def unpack(
    sign_ptr, row_ptr, col_ptr, dst_ptr, ROWS, COLS, scaling, HAS_ROW: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr
):
    offs_r = tl.program_id(0) * BR + tl.arange(0, BR)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (offs_r < ROWS)[:, None] & (offs_c < COLS)[None, :]
    pos = offs_r[:, None] * COLS + offs_c[None, :]
    bit = (tl.load(sign_ptr + (pos >> 3), mask=mask, other=0).to(tl.int32) >> (7 - (pos & 7))) & 1
    sign = tl.where(mask, bit.to(tl.float32) * 2.0 - 1.0, 0.0)
    val = sign * tl.load(col_ptr + offs_c, mask=offs_c < COLS, other=0.0)[None, :]
    if HAS_ROW:
        val = val * (tl.load(row_ptr + offs_r, mask=offs_r < ROWS, other=0.0) * scaling)[:, None]
    tl.store(dst_ptr + pos, val.to(dst_ptr.dtype.element_ty), mask=mask)
