"""The PTQ solver: alternating minimisation of ``‖PQ − diag(a) S_B diag(m) S_A diag(b)‖_F²``.

One iteration updates, in turn, each block to its exact minimiser with the others fixed, so the
objective never increases:

1. the rows of ``S_B``: for row ``i`` the objective is the binary quadratic
   ``f_i(s) = −2 sᵀc_i + a_i² sᵀ H s`` in ``s ∈ {±1}^r`` (``H = diag(m) S_A diag(b²) S_Aᵀ diag(m)``,
   ``c_i = a_i m ⊙ (S_A diag(b) Tᵢᵀ)``). Flipping coordinate ``k`` changes it by
   ``4 (a_i² H_kk − s_k (a_i² (Hs)_k − c_ik))``; cyclic sweeps flip every coordinate whose change is
   negative until none is (exact coordinate descent, vectorised over all rows of all layers; the
   running ``a_i² Hs − c_i`` is updated only for the rows that flipped, and rows at a local
   minimum drop out);
2. ``a`` (per row, closed form), then ``m`` (an r×r system);
3. the columns of ``S_A`` in the same way, then ``b`` and ``m``.

Every product with the out×k / k×in factors is computed once per iteration and shared (the
objective comes out of the same Gram matrices).

It stops when the relative improvement of an iteration falls below ``tol`` (per layer: converged
layers of a batch are frozen, so a layer's result does not depend on when its neighbours stop).
Everything is deterministic: no random numbers, fixed operation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lordba.convert.factorize import (
    Factors,
    Target,
    ls_scale_in,
    ls_scale_mid,
    ls_scale_out,
    objective,
    safe_div,
    solve_mid,
)

EXACT = 1e-24  # relative squared error treated as an exact fit


@dataclass
class SolveStats:
    """Per layer of a batch: objective at the start and the end, iterations run."""

    initial: torch.Tensor
    final: torch.Tensor
    iterations: torch.Tensor


def sign_sweeps(
    S: torch.Tensor, C: torch.Tensor, W: torch.Tensor, H: torch.Tensor, max_sweeps: int = 16, eps: float = 1e-6
) -> torch.Tensor:
    """Minimise ``Σ_rows (−2 sᵀc + w sᵀHs)`` over sign vectors ``s`` by cyclic coordinate flips.

    Coordinate-major layout: ``S, C``: [L, r, n] (``n`` rows ``s``, ``c`` per layer, stored by
    coordinate), ``W``: [L, n] (row weights ≥ 0), ``H``: [L, r, r] symmetric PSD. With the running
    ``g = w Hs − c``, flipping ``s_k`` lowers the row's value iff ``s_k g_k > w H_kk``; a flip is
    taken only if it wins by more than ``eps`` times the size of the terms (rounding cannot cause
    cycles). Each sweep visits only the rows where some single flip helps (a row unchanged since
    it was found at a local minimum stays one), so late iterations cost little. Returns the new
    ``S`` (same layout).
    """
    r = S.shape[1]
    S = S.clone(memory_format=torch.contiguous_format)
    G = W[:, None, :] * (H @ S) - C  # running w·Hs − c
    thr = ((1 + eps) * H.diagonal(dim1=-2, dim2=-1))[:, :, None] * W[:, None, :] + eps * C.abs()
    lay = col = None  # the candidate rows (layer, row); None: all
    for _ in range(max_sweeps):
        # rows where some single flip helps; the others are already at a local minimum
        if lay is None:
            lay, col = (S * G > thr).any(1).nonzero(as_tuple=True)
        else:
            keep = (S[lay, :, col] * G[lay, :, col] > thr[lay, :, col]).any(1).nonzero()[:, 0]
            lay, col = lay[keep], col[keep]
        if lay.numel() == 0:
            break
        # one cyclic sweep over the candidates, gathered coordinate-major [r, rows]
        St, Gt, Tt = (x[lay, :, col].T.contiguous() for x in (S, G, thr))
        Wt = W[lay, col]
        moved = torch.zeros(lay.numel(), dtype=torch.bool, device=S.device)
        for k in range(r):
            hit = (St[k] * Gt[k] > Tt[k]).nonzero()[:, 0]
            if hit.numel() == 0:
                continue
            moved[hit] = True
            step = -2.0 * St[k, hit]
            St[k, hit] += step
            Gt.index_add_(1, hit, H[lay[hit], :, k].T * (Wt[hit] * step))
        S[lay, :, col] = St.T
        G[lay, :, col] = Gt.T
        keep = moved.nonzero()[:, 0]
        lay, col = lay[keep], col[keep]
        if lay.numel() == 0:
            break
    return S


def iterate(t: Target, f: Factors, max_sweeps: int = 16) -> torch.Tensor:
    """One alternating-minimisation iteration (in place); returns the new objective. Each product
    is computed once and shared by the steps that need it (every step stays exact)."""
    R = f.right()
    GR, QR = R @ R.mT, t.Q @ R.mT  # r×r, k×r
    PQR = t.P @ QR  # out×r: row i is (T R^T)_i
    # 1. rows of S_B: c_i = a_i m ⊙ (T Rᵀ)_i, weight a_i², H = diag(m) RRᵀ diag(m)
    m = f.m
    H = m[:, :, None] * GR * m[:, None, :]
    C = (f.a[:, :, None] * PQR * m[:, None, :]).mT
    f.sign_B = sign_sweeps(f.sign_B.mT, C, f.a.square(), H, max_sweeps).mT.contiguous()
    # 2. a, then m
    Lm = f.sign_B * m[:, None, :]
    f.a = safe_div((PQR * Lm).sum(-1), ((Lm @ GR) * Lm).sum(-1), f.a)
    U = f.a[:, :, None] * f.sign_B
    GU, UP = U.mT @ U, U.mT @ t.P  # r×r, r×k
    f.m = solve_mid(GU * GR, (UP * QR.mT).sum(-1), f.m)
    # 3. columns of S_A: c_j = b_j (Lᵀ T)_{:,j}, weight b_j², H = LᵀL = diag(m) UᵀU diag(m)
    m = f.m
    H = m[:, :, None] * GU * m[:, None, :]
    LtT = m[:, :, None] * (UP @ t.Q)  # r×in
    f.sign_A = sign_sweeps(f.sign_A, LtT * f.b[:, None, :], f.b.square(), H, max_sweeps).contiguous()
    # 4. b, then m
    f.b = safe_div((LtT * f.sign_A).sum(-2), ((H @ f.sign_A) * f.sign_A).sum(-2), f.b)
    R = f.right()
    GR, QR = R @ R.mT, t.Q @ R.mT
    f.m = solve_mid(GU * GR, (UP * QR.mT).sum(-1), f.m)
    # objective ‖T‖² − 2 tr(PᵀL · Q Rᵀ) + tr(LᵀL · RRᵀ), with PᵀL = (UᵀP)ᵀ diag(m)
    m = f.m
    cross = (UP.mT * m[:, None, :] * QR).sum((-2, -1))
    dd = (m[:, :, None] * GU * m[:, None, :] * GR).sum((-2, -1))
    return (t.norm2 - 2.0 * cross + dd).clamp(min=0.0)


def refit_scales(t: Target, f: Factors, rounds: int = 2, live: torch.Tensor | None = None) -> None:
    """Least-squares sweeps over ``b, a, m`` with the signs fixed (in place); ``live`` [..., r] bool: only
    those components' ``m`` are fitted, the others are 0 (:func:`~lordba.convert.factorize.ls_scale_mid`)."""
    for _ in range(rounds):
        f.b = ls_scale_in(t, f)
        f.a = ls_scale_out(t, f)
        f.m = ls_scale_mid(t, f, live)


def _objective64(t64: Target, f: Factors) -> torch.Tensor:
    """:func:`objective` in float64 (``t64``: the target in float64)."""
    return objective(t64, Factors(*(x.double() for x in (f.sign_A, f.sign_B, f.b, f.m, f.a))))


def solve(t: Target, f: Factors, iters: int = 30, tol: float = 1e-3, max_sweeps: int = 16) -> SolveStats:
    """Run :func:`iterate` on a batch [L, ...] until each layer's relative improvement is below
    ``tol`` or ``iters`` iterations; ``f`` is updated in place. The objective that decides the stop
    is computed in float64 whatever the working dtype: in float32 the Gram identity's cancellation
    (``‖T‖² − 2⟨T, D⟩ + ‖D‖²``) is noise of ~1e-7·‖T‖², so a near-exact fit stopped at a relative
    error of ~3e-4 where float32 factors reach ~1e-6."""
    exact64 = t.P.dtype == torch.float64
    t64 = t if exact64 else Target.of(t.P.double(), t.Q.double())
    value = _objective64(t64, f)
    initial = value.clone()
    count = torch.zeros_like(value, dtype=torch.long)
    done = value <= EXACT * t64.norm2
    for _ in range(iters):
        idx = (~done).nonzero()[:, 0]
        if idx.numel() == 0:
            break
        sub_t, sub_f = t.select(idx), f.select(idx)
        new = iterate(sub_t, sub_f, max_sweeps)
        if not exact64:
            new = _objective64(t64.select(idx), sub_f)
        keep = new <= value[idx]  # guards against rounding; exact arithmetic never increases
        sel = idx[keep]
        f.assign(sel, sub_f.select(keep.nonzero()[:, 0]))
        gain = (value[idx] - torch.minimum(new, value[idx])) / value[idx].clamp(min=1e-300)
        value[sel] = new[keep]
        count[idx] += 1
        done[idx] = (gain < tol) | ~keep | (torch.minimum(new, value[idx]) <= EXACT * t64.norm2[idx])
    return SolveStats(initial, value, count)
