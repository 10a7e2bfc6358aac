"""The PTQ solver: alternating minimisation of ``‖PQ − diag(a) S_B diag(m) S_A diag(b)‖_F²``.

One iteration updates, in turn, each block to its exact minimiser with the others fixed, so the
objective never increases:

1. the rows of ``S_B``: for row ``i`` the objective is the binary quadratic
   ``f_i(s) = −2 sᵀc_i + a_i² sᵀ H s`` in ``s ∈ {±1}^r`` (``H = diag(m) S_A diag(b²) S_Aᵀ diag(m)``,
   ``c_i = a_i m ⊙ (S_A diag(b) Tᵢᵀ)``). Flipping coordinate ``k`` changes it by
   ``4 (a_i² H_kk − s_k (a_i² (Hs)_k − c_ik))``; cyclic sweeps flip every coordinate whose change is
   negative until none is (exact coordinate descent, vectorised over all rows of all layers; the
   running ``Hs`` is updated only for the rows that flipped);
2. ``a`` (per row, closed form), then ``m`` (an r×r system);
3. the columns of ``S_A`` in the same way, then ``b`` and ``m``.

It stops when the relative improvement of an iteration falls below ``tol`` (per layer: converged
layers of a batch are frozen, so a layer's result does not depend on when its neighbours stop).
Everything is deterministic: no random numbers, fixed operation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..factorize import Factors, Target, ls_scale_in, ls_scale_mid, ls_scale_out, objective

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
    """Minimise ``Σ_rows (−2 sᵀc + w sᵀHs)`` over rows ``s`` of ``S`` ∈ {±1} by cyclic coordinate flips.

    ``S, C``: [L, n, r] (rows, their linear terms), ``W``: [L, n] (row weights ≥ 0), ``H``: [L, r, r]
    symmetric PSD. A flip is taken only if it lowers the row's objective by more than ``eps`` times
    the size of its terms (so rounding cannot cause cycles). A row with no flip in a sweep is at a
    local minimum (no single flip helps) and leaves the active set. Returns the new ``S``.
    """
    L, n, r = S.shape
    # Coordinate-major layout [r, rows]: each coordinate's values are contiguous.
    S_all = S.reshape(L * n, r).mT.contiguous()
    rows = torch.arange(L * n, device=S.device)
    layer = torch.arange(L, device=S.device).repeat_interleave(n)
    St, Ct, Wt = S_all, C.reshape(L * n, r).mT.contiguous(), W.reshape(L * n)
    Tt = (S @ H).reshape(L * n, r).mT.contiguous()  # running H s per row
    Ht = H.mT.contiguous()  # Ht[l, :, k] = H[l, k, :]
    Dt = H.diagonal(dim1=-2, dim2=-1)[layer].mT.contiguous()
    for sweep in range(max_sweeps):
        moved = torch.zeros(St.shape[1], dtype=torch.bool, device=S.device)
        for k in range(r):
            s = St[k]
            wh = Wt * Dt[k]
            c = Ct[k]
            delta = wh - s * (Wt * Tt[k] - c)
            hit = (delta < -eps * (wh + c.abs())).nonzero()[:, 0]
            if hit.numel() == 0:
                continue
            moved[hit] = True
            step = -2.0 * s[hit]
            St[k, hit] += step
            Tt[:, hit] += step[None, :] * Ht[layer[hit], :, k].mT
        if sweep:  # sweep 0 worked on S_all itself; later sweeps on gathered copies
            S_all[:, rows] = St
        keep = moved.nonzero()[:, 0]
        if keep.numel() == 0:
            break
        rows = rows[keep]
        layer = layer[keep]
        St, Ct, Wt, Tt, Dt = St[:, keep], Ct[:, keep], Wt[keep], Tt[:, keep], Dt[:, keep]
    return S_all.mT.reshape(L, n, r)


def update_sign_B(t: Target, f: Factors, max_sweeps: int) -> None:
    """Exact coordinate descent on the rows of ``S_B`` (in place)."""
    R = f.right()
    H = f.m[:, :, None] * (R @ R.mT) * f.m[:, None, :]
    C = f.a[:, :, None] * (t.P @ (t.Q @ R.mT)) * f.m[:, None, :]
    f.sign_B = sign_sweeps(f.sign_B, C, f.a.square(), H, max_sweeps)


def update_sign_A(t: Target, f: Factors, max_sweeps: int) -> None:
    """Exact coordinate descent on the columns of ``S_A`` (in place)."""
    U = f.a[:, :, None] * f.sign_B
    H = f.m[:, :, None] * (U.mT @ U) * f.m[:, None, :]
    C = (f.m[:, :, None] * ((U.mT @ t.P) @ t.Q) * f.b[:, None, :]).mT
    f.sign_A = sign_sweeps(f.sign_A.mT, C, f.b.square(), H, max_sweeps).mT.contiguous()


def iterate(t: Target, f: Factors, max_sweeps: int = 16) -> None:
    """One alternating-minimisation iteration (in place); the objective does not increase."""
    update_sign_B(t, f, max_sweeps)
    f.a = ls_scale_out(t, f)
    f.m = ls_scale_mid(t, f)
    update_sign_A(t, f, max_sweeps)
    f.b = ls_scale_in(t, f)
    f.m = ls_scale_mid(t, f)


def refit_scales(t: Target, f: Factors, rounds: int = 2) -> None:
    """Least-squares sweeps over ``b, a, m`` with the signs fixed (in place)."""
    for _ in range(rounds):
        f.b = ls_scale_in(t, f)
        f.a = ls_scale_out(t, f)
        f.m = ls_scale_mid(t, f)


def solve(t: Target, f: Factors, iters: int = 30, tol: float = 1e-4, max_sweeps: int = 16) -> SolveStats:
    """Run :func:`iterate` on a batch [L, ...] until each layer's relative improvement is below
    ``tol`` or ``iters`` iterations; ``f`` is updated in place."""
    value = objective(t, f)
    initial = value.clone()
    count = torch.zeros_like(value, dtype=torch.long)
    done = value <= EXACT * t.norm2
    for _ in range(iters):
        idx = (~done).nonzero()[:, 0]
        if idx.numel() == 0:
            break
        sub_t, sub_f = t.select(idx), f.select(idx)
        iterate(sub_t, sub_f, max_sweeps)
        new = objective(sub_t, sub_f)
        keep = new <= value[idx]  # guards against rounding; exact arithmetic never increases
        sel = idx[keep]
        f.assign(sel, sub_f.select(keep.nonzero()[:, 0]))
        gain = (value[idx] - torch.minimum(new, value[idx])) / value[idx].clamp(min=1e-300)
        value[sel] = new[keep]
        count[idx] += 1
        done[idx] = (gain < tol) | ~keep | (torch.minimum(new, value[idx]) <= EXACT * sub_t.norm2)
    return SolveStats(initial, value, count)
