"""Where the solver starts: the gauge of the factor pair whose signs seed it.

``BA = (BG)(G⁻¹A)`` for any invertible ``G``, and the sign pattern of a factor (and so its RMR)
depends on ``G``. Choices, all measured in ``docs/conversion.md``:

* ``"svd"`` (default): the balanced SVD pair ``U Σ^½``, ``Σ^½ Vᵀ``, i.e. the paper's Eq. 7 init;
* ``"lora"``: the LoRA's own factors, SVID of each (``B ≈ diag(u) S_B diag(v)``, same for ``A``);
  exact when both factors have RMR 0. Needs ``r ≥ k`` (it cannot truncate); below, ``"svd"``;
* ``"rotation"``: the balanced SVD pair rotated by an orthogonal ``G`` chosen (Adam on a skew
  parametrisation, ``G = exp(X − Xᵀ)``) to lower ``ρ(BG)² + ρ(GᵀA)²``.

For ``r`` above the pair's rank the extra components come from the residual
(:func:`lordba.convert.factorize.fill_residual`); so do, for ``"svd"`` and ``"rotation"``, those beyond
ΔW's numerical rank (:func:`lordba.convert.factorize.numerical_rank`: rounding noise).
"""

from __future__ import annotations

import torch

from lordba.convert.factorize import (
    Factors,
    Target,
    factor_svd,
    factors_from_svid,
    fill_residual,
    numerical_rank,
    rmr,
    svd_init,
)
from lordba.convert.solver import refit_scales
from lordba.errors import ConfigError

GAUGES = ("svd", "lora", "rotation")


def balanced_pair(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_n Σ_n^½, Σ_n^½ V_nᵀ)`` with ``n = min(r, rank)`` from :func:`factor_svd`'s result: the
    balanced SVD factors."""
    U, sigma, Vh = svd
    n = min(r, sigma.shape[-1])
    root = sigma[..., :n].sqrt()
    return U[..., :n] * root[..., None, :], root[..., :, None] * Vh[..., :n, :]


def _sigma1_sq(M: torch.Tensor) -> torch.Tensor:
    """``σ₁(M)²`` through the Gram matrix of the smaller side (differentiable)."""
    G = M.mT @ M if M.shape[-2] >= M.shape[-1] else M @ M.mT
    return torch.linalg.eigvalsh(G)[..., -1]


def rotation_to_lower_rmr(
    Bg: torch.Tensor, Ag: torch.Tensor, steps: int = 100, lr: float = 0.05, live: torch.Tensor | None = None
) -> torch.Tensor:
    """Orthogonal ``G`` [..., n, n] lowering ``ρ(Bg G)² + ρ(Gᵀ Ag)²``; the best iterate per layer is
    kept, and ``G = I`` (the start) is among them, so the result is never worse than no rotation. A zero
    pair (a zero ΔW) keeps ``G = I``: its norms are floored, so its loss is a constant 2, not 0/0.
    ``live`` [..., n] bool: ``G`` mixes only those components and is the identity on the others."""
    Bg, Ag = Bg.detach().double(), Ag.detach().double()
    n = Bg.shape[-1]
    tiny = torch.finfo(torch.float64).tiny
    nB = Bg.pow(2).sum((-2, -1)).clamp(min=tiny)
    nA = Ag.pow(2).sum((-2, -1)).clamp(min=tiny)
    X = torch.zeros((*Bg.shape[:-2], n, n), dtype=torch.float64, requires_grad=True)
    mask = None if live is None else (live[..., :, None] & live[..., None, :]).to(torch.float64)
    opt = torch.optim.Adam([X], lr=lr)
    best = torch.eye(n, dtype=torch.float64).expand_as(X).clone()
    best_loss = torch.full(Bg.shape[:-2], float("inf"), dtype=torch.float64)
    with torch.enable_grad():
        for _ in range(steps + 1):
            Xm = X if mask is None else X * mask
            G = torch.linalg.matrix_exp(Xm - Xm.mT)
            loss = 2.0 - _sigma1_sq((Bg @ G).abs()) / nB - _sigma1_sq((G.mT @ Ag).abs()) / nA
            better = loss.detach() < best_loss
            best[better] = G.detach()[better]
            best_loss = torch.minimum(best_loss, loss.detach())
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
    return best


def initial_factors(
    t: Target, r: int, gauge: str, rotation_steps: int = 100
) -> tuple[Factors, torch.Tensor, torch.Tensor, str]:
    """Start factors for gauge ``gauge``, the RMR of the seeding pair ``(ρ(A_g), ρ(B_g))``, and the
    gauge actually used (``"lora"`` falls back to ``"svd"`` when ``r`` is below the LoRA rank)."""
    if gauge not in GAUGES:
        raise ConfigError(f"gauge must be one of {GAUGES}, got {gauge!r}")
    k = t.P.shape[-1]
    if gauge == "lora" and r < k:
        gauge = "svd"
    svd = dead = None
    if gauge == "lora":
        Bg, Ag = t.P, t.Q
    else:
        svd = factor_svd(t.P, t.Q)
        Bg, Ag = balanced_pair(svd, r)
        # components beyond ΔW's numerical rank are rounding noise: seeded empty, filled from the residual
        size = max(t.P.shape[-2], t.Q.shape[-1], k)
        dead = torch.arange(Bg.shape[-1], device=Bg.device) >= numerical_rank(svd[1], size, t.eps)[..., None]
        Bg, Ag = torch.where(dead[..., None, :], 0.0, Bg), torch.where(dead[..., :, None], 0.0, Ag)
        if gauge == "rotation" and Bg.shape[-1] > 1:
            G = rotation_to_lower_rmr(Bg, Ag, rotation_steps, live=~dead).to(Bg.dtype)
            Bg, Ag = Bg @ G, G.mT @ Ag
    rho_A, rho_B = rmr(Ag), rmr(Bg)
    if gauge == "svd":
        return svd_init(t, r, svd), rho_A, rho_B, gauge
    f = factors_from_svid(Bg, Ag)
    if dead is not None and bool(dead.any()):
        f.m = torch.where(dead, 0.0, f.m)
    refit_scales(t, f, rounds=1, live=None if dead is None else ~dead)
    if f.r < r or (dead is not None and bool(dead.any())):
        f = fill_residual(t, f, r, dead)
    return f, rho_A, rho_B, gauge
