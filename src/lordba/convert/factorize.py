"""The math of the double-binary factorisation (SPEC §1, §3), written once.

A target ``T = P Q`` (``P`` out×k, ``Q`` k×in: a LoRA's ``B`` and ``A``, possibly rescaled) is
approximated by ``D = diag(a) S_B diag(m) S_A diag(b)`` with ``S_B`` out×r and ``S_A`` r×in of ±1.
Nothing here forms an out×in matrix: every quantity goes through the factors and r×r / k×r Gram
matrices, e.g.

    ‖PQ − LR‖² = tr(PᵀP · QQᵀ) − 2 tr(PᵀL · RQᵀ) + tr(LᵀL · RRᵀ),   L = diag(a) S_B diag(m), R = S_A diag(b).

Contents:

* :func:`rmr`: residual-to-magnitude ratio ``ρ(F) = sqrt(1 − σ₁(|F|)² / ‖F‖_F²)`` of a factor;
* :func:`svid`: ``F ≈ diag(u) sign(F) diag(v)`` with ``u vᵀ`` the best rank-1 approximation of ``|F|``
  (non-negative by Perron–Frobenius);
* :func:`factor_svd`: thin SVD of ``P Q`` from QR of ``P`` and ``Qᵀ`` and the SVD of a k×k core,
  with a canonical sign per component (deterministic);
* :func:`svd_init`: the paper's closed-form "Eq. 7" initialisation (signs of the singular vectors,
  ``m = σ``, least-squares ``b`` then ``a``); for ``r`` above the target's rank, extra components
  are filled greedily from the SVD of the residual (also in factored form);
* :func:`ls_scale_out`, :func:`ls_scale_in`, :func:`ls_scale_mid`: exact least squares for one
  scale vector with everything else fixed (``a`` and ``b`` per coordinate, ``m`` an r×r system);
* :func:`objective`: ``‖PQ − D‖_F²`` by the Gram identity above.

Every function accepts leading batch dimensions (layers of equal shape solved together).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lordba.core.ste import hard_sign

_TINY = 1e-300


@dataclass
class Target:
    """The matrix to approximate, ``T = P Q``, and ``‖T‖_F²``; build it with :meth:`of`. ``eps``: the relative
    precision of the factors ``P``, ``Q`` were made from (:func:`numerical_rank`; ``None``: the working dtype's),
    coarser than the working dtype's when float32 LoRA factors are solved in float64."""

    P: torch.Tensor  # [..., out, k]
    Q: torch.Tensor  # [..., k, in]
    norm2: torch.Tensor  # [...]
    eps: float | None = None

    @classmethod
    def of(cls, P: torch.Tensor, Q: torch.Tensor, eps: float | None = None) -> Target:
        """``‖PQ‖² = tr(PᵀP · QQᵀ)`` (both Grams symmetric, so an elementwise sum)."""
        return cls(P, Q, ((P.mT @ P) * (Q @ Q.mT)).sum((-2, -1)), eps)

    def select(self, idx: torch.Tensor) -> Target:
        """The layers ``idx`` of a batched target."""
        return Target(self.P[idx], self.Q[idx], self.norm2[idx], self.eps)


@dataclass
class Factors:
    """``D = diag(a) S_B diag(m) S_A diag(b)`` with ±1 sign tensors in the working dtype."""

    sign_A: torch.Tensor  # [..., r, in]
    sign_B: torch.Tensor  # [..., out, r]
    b: torch.Tensor  # [..., in]    scale_in
    m: torch.Tensor  # [..., r]     scale_mid
    a: torch.Tensor  # [..., out]   scale_out

    @property
    def r(self) -> int:
        """The rank (rows of ``sign_A``)."""
        return self.sign_A.shape[-2]

    def left(self) -> torch.Tensor:
        """``L = diag(a) S_B diag(m)`` (out×r)."""
        return self.a[..., :, None] * self.sign_B * self.m[..., None, :]

    def right(self) -> torch.Tensor:
        """``R = S_A diag(b)`` (r×in)."""
        return self.sign_A * self.b[..., None, :]

    def select(self, idx: torch.Tensor) -> Factors:
        """The layers ``idx`` of batched factors."""
        return Factors(*(getattr(self, n)[idx] for n in _FIELDS))

    def assign(self, idx: torch.Tensor, other: Factors) -> None:
        """Write ``other`` into the layers ``idx`` (in place)."""
        for n in _FIELDS:
            getattr(self, n)[idx] = getattr(other, n)

    def dense(self) -> torch.Tensor:
        """The out×in matrix ``D`` (for small sizes and checks only)."""
        return self.left() @ self.right()


_FIELDS = ("sign_A", "sign_B", "b", "m", "a")


# ------------------------------------------------------------------------------------------ factors
def _top_pair(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triple ``(σ₁, u, v)`` of a non-negative ``M`` [..., p, q]; ``u, v`` unit and ≥ 0.

    Through the Gram matrix of the smaller side (q×q or p×p), so a 4096×16 factor costs a 16×16
    eigenproblem. The eigenvector's sign is arbitrary: Perron–Frobenius says the top one can be
    taken non-negative, so it is flipped to a positive sum and rounding negatives are clipped.
    A zero ``M`` gives ``σ₁ = 0`` and ``u = 0`` (the floor of the divisions is the dtype's own
    smallest normal: ``_TINY`` is 0 in float32).
    """
    transpose = M.shape[-2] < M.shape[-1]
    if transpose:
        M = M.mT
    tiny = torch.finfo(M.dtype).tiny
    v = _top_eigvec(M.mT @ M).to(M.dtype)
    v = v * torch.where(v.sum(-1, keepdim=True) >= 0, 1.0, -1.0).to(v.dtype)
    v = v.clamp(min=0)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=tiny)
    u = (M @ v[..., None])[..., 0]
    sigma = u.norm(dim=-1)
    u = u / sigma[..., None].clamp(min=tiny)
    return (sigma, v, u) if transpose else (sigma, u, v)


def _top_eigvec(G: torch.Tensor) -> torch.Tensor:
    """Top eigenvector of the symmetric PSD ``G`` [..., q, q], in float64.

    LAPACK's ``syevd`` can fail to converge on nearly rank-deficient Gram matrices (seen on real
    LoRA factors); a relative jitter of 1e-12·trace on the diagonal leaves the top eigenvector
    unchanged to working precision and makes the problem well posed.
    """
    G = G.double()
    try:
        return torch.linalg.eigh(G)[1][..., -1]
    except torch.linalg.LinAlgError:
        eye = torch.eye(G.shape[-1], dtype=G.dtype)
        trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
        return torch.linalg.eigh(G + 1e-12 * trace.clamp(min=_TINY) * eye)[1][..., -1]


def rmr(F: torch.Tensor) -> torch.Tensor:
    """Residual-to-magnitude ratio ``sqrt(1 − σ₁(|F|)² / ‖F‖_F²)`` of ``F`` [..., p, q] (0 for F = 0).

    ``ρ(F) = min_{u,v ≥ 0} ‖|F| − u vᵀ‖_F / ‖F‖_F``: sign × channel scales represent ``F`` exactly
    iff ``ρ = 0``; i.i.d. Gaussian entries give ≈ 0.60, uniform ≈ 0.50. Computed in float64.
    """
    F = F.detach().double()
    fro2 = F.pow(2).sum((-2, -1))
    sigma, _, _ = _top_pair(F.abs())
    ratio = torch.where(fro2 > 0, sigma.pow(2) / fro2.clamp(min=_TINY), torch.ones_like(fro2))
    return (1.0 - ratio).clamp(min=0.0).sqrt()


def svid(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, S, v)`` with ``F ≈ diag(u) S diag(v)``: ``S = sign(F)`` (sign(0) = +1) and ``u vᵀ`` the
    best rank-1 approximation of ``|F|`` (``u, v ≥ 0``, the singular value split evenly)."""
    sigma, u, v = _top_pair(F.abs())
    root = sigma.sqrt()[..., None]
    return u * root, hard_sign(F), v * root


def factor_svd(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``P Q = U diag(σ) Vh`` without forming ``P Q``: QR of ``P`` and ``Qᵀ``, SVD of the
    small core ``R_P R_Qᵀ``. Each component's sign is canonical (the largest-magnitude entry of the
    ``U`` column is positive), so the result is deterministic. ``n = min(out, in, k)`` components."""
    Qp, Rp = torch.linalg.qr(P)
    Qq, Rq = torch.linalg.qr(Q.mT)
    Uc, sigma, Vch = torch.linalg.svd(Rp @ Rq.mT, full_matrices=False)
    U = Qp @ Uc
    Vh = Vch @ Qq.mT
    idx = U.abs().argmax(dim=-2, keepdim=True)
    flip = torch.where(torch.gather(U, -2, idx) < 0, -1.0, 1.0).to(U.dtype)  # [..., 1, n]
    return U * flip, sigma, Vh * flip.mT


# ------------------------------------------------------------------------------------------ objective
def objective(t: Target, f: Factors) -> torch.Tensor:
    """``‖P Q − D‖_F²`` via r×r / k×r Gram matrices (never out×in)."""
    L, R = f.left(), f.right()
    cross = ((t.P.mT @ L) * (t.Q @ R.mT)).sum((-2, -1))
    dd = ((L.mT @ L) * (R @ R.mT)).sum((-2, -1))
    return (t.norm2 - 2.0 * cross + dd).clamp(min=0.0)


def relative_error(t: Target, f: Factors) -> torch.Tensor:
    """``‖P Q − D‖_F / ‖P Q‖_F`` (0 where the target is 0 and so is the error)."""
    err = objective(t, f)
    return torch.where(t.norm2 > 0, (err / t.norm2.clamp(min=_TINY)).sqrt(), err.sqrt())


# ------------------------------------------------------------------------------------------ least squares
def safe_div(num: torch.Tensor, den: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den`` is meaningfully positive, else the previous value (which then
    does not affect the objective: its row or column of ``D`` is zero)."""
    ok = den > den.amax(-1, keepdim=True).clamp(min=_TINY) * 1e-12
    return torch.where(ok, num / den.clamp(min=_TINY), old)


def ls_scale_out(t: Target, f: Factors) -> torch.Tensor:
    """Least-squares ``a`` (per output row) with the rest fixed."""
    Lm = f.sign_B * f.m[..., None, :]  # out×r
    R = f.right()
    num = ((t.P @ (t.Q @ R.mT)) * Lm).sum(-1)
    den = ((Lm @ (R @ R.mT)) * Lm).sum(-1)
    return safe_div(num, den, f.a)


def ls_scale_in(t: Target, f: Factors) -> torch.Tensor:
    """Least-squares ``b`` (per input column) with the rest fixed."""
    L = f.left()
    num = (((L.mT @ t.P) @ t.Q) * f.sign_A).sum(-2)
    den = (((L.mT @ L) @ f.sign_A) * f.sign_A).sum(-2)
    return safe_div(num, den, f.b)


def ls_scale_mid(t: Target, f: Factors, live: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares ``m`` with the rest fixed: ``(UᵀU ∘ VVᵀ) m = diag(UᵀP · QVᵀ)``, with
    ``U = diag(a) S_B``, ``V = S_A diag(b)`` (see :func:`solve_mid`). ``live`` [..., r] bool: only those
    components are fitted, the others get ``m = 0`` (their placeholder signs may repeat)."""
    U = f.a[..., :, None] * f.sign_B
    V = f.right()
    G, h = (U.mT @ U) * (V @ V.mT), ((U.mT @ t.P) * (t.Q @ V.mT).mT).sum(-1)
    if live is not None:
        eye = torch.eye(G.shape[-1], dtype=torch.bool, device=G.device)
        G = torch.where(eye | (live[..., :, None] & live[..., None, :]), G, 0.0)
        h = torch.where(live, h, 0.0)
    return solve_mid(G, h, torch.where(live, f.m, 0.0) if live is not None else f.m)


def solve_mid(G: torch.Tensor, h: torch.Tensor, old: torch.Tensor, ridge: float = 1e-12) -> torch.Tensor:
    """The minimiser of ``mᵀGm − 2hᵀm`` (``G`` PSD); a relative ``ridge`` keeps a singular system
    solvable, and ``old`` is kept where the solution is not finite or does not lower the value."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=_TINY)[..., None, None]
    m = torch.linalg.solve_ex(G + ridge * scale * eye, h[..., None])[0][..., 0]

    def q(x: torch.Tensor) -> torch.Tensor:
        return (x[..., None, :] @ G @ x[..., :, None])[..., 0, 0] - 2.0 * (h * x).sum(-1)

    better = torch.isfinite(m).all(-1) & (q(m) <= q(old))
    return torch.where(better[..., None], m, old)


# ------------------------------------------------------------------------------------------ init
def svd_init(t: Target, r: int, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Factors:
    """The paper's closed-form initialisation ("Eq. 7"): thin SVD ``PQ = U Σ Vᵀ``; ``S_B = sign(U_r)``,
    ``S_A = sign(V_rᵀ)``, ``m = σ_1..r``; least-squares ``b`` with ``a = 1``, then ``a``.

    Exact for a rank-1 target. Components beyond the target's numerical rank (:func:`numerical_rank`:
    their singular vectors are rounding noise) and those ``r`` adds beyond the SVD's are filled by
    :func:`fill_residual` (beyond the paper: Eq. 7 alone leaves them at ``m ≈ 0``). ``svd``: the result
    of :func:`factor_svd` if already computed.
    """
    U, sigma, Vh = svd if svd is not None else factor_svd(t.P, t.Q)
    n = min(r, sigma.shape[-1])
    out, inn = t.P.shape[-2], t.Q.shape[-1]
    dead = torch.arange(n, device=sigma.device) >= numerical_rank(sigma, max(out, inn, t.P.shape[-1]), t.eps)[..., None]
    ones = torch.ones((*t.P.shape[:-2], out), dtype=t.P.dtype, device=t.P.device)
    f = Factors(
        sign_A=hard_sign(Vh[..., :n, :]),
        sign_B=hard_sign(U[..., :n]),
        b=torch.ones((*t.P.shape[:-2], inn), dtype=t.P.dtype, device=t.P.device),
        m=torch.where(dead, 0.0, sigma[..., :n]),
        a=ones,
    )
    f.b = ls_scale_in(t, f)
    f.a = ls_scale_out(t, f)
    return fill_residual(t, f, r, dead) if r > n or bool(dead.any()) else f


def numerical_rank(sigma: torch.Tensor, size: int, eps: float | None = None) -> torch.Tensor:
    """How many singular values ``sigma`` [..., n] (descending) exceed ``size · eps · σ₁`` (NumPy's
    ``matrix_rank`` rule): the smaller ones are rounding noise of an exactly lower-rank product. ``eps``: the
    precision of the factors the product was made from (:attr:`Target.eps`), else ``sigma``'s dtype's."""
    tol = size * (torch.finfo(sigma.dtype).eps if eps is None else eps) * sigma[..., :1]
    return (sigma > tol).sum(-1)


def fill_residual(t: Target, f: Factors, r: int, dead: torch.Tensor | None = None) -> Factors:
    """Grow ``f`` to rank ``r`` and refill its ``dead`` components ([..., f.r] bool, ``m = 0``): each
    takes, in order, a leading singular pair of the residual ``PQ − D = [P, −L][Q; R]`` (factored form,
    only those above its numerical rank), as signs; then least-squares ``m``. Repeated on the new
    residual while some layer still has dead components and its residual has any left."""
    if dead is None:
        dead = torch.zeros(f.m.shape, dtype=torch.bool, device=f.m.device)
    if f.r < r:
        add = r - f.r
        f = replace(
            f,
            sign_A=torch.cat([f.sign_A, f.sign_A.new_ones((*f.sign_A.shape[:-2], add, f.sign_A.shape[-1]))], -2),
            sign_B=torch.cat([f.sign_B, f.sign_B.new_ones((*f.sign_B.shape[:-1], add))], -1),
            m=torch.cat([f.m, f.m.new_zeros((*f.m.shape[:-1], add))], -1),
        )
        dead = torch.cat([dead, dead.new_ones((*dead.shape[:-1], add))], -1)
    while bool(dead.any()):
        U, sigma, Vh = factor_svd(torch.cat([t.P, -f.left()], -1), torch.cat([t.Q, f.right()], -2))
        size = max(t.P.shape[-2], t.Q.shape[-1], U.shape[-1])
        order = dead.long().cumsum(-1) - 1  # the j-th dead component takes the residual's j-th pair
        take = dead & (order < numerical_rank(sigma, size, t.eps)[..., None])
        if not bool(take.any()):
            break
        idx = order.clamp(0, sigma.shape[-1] - 1)
        new_B = torch.gather(U, -1, idx[..., None, :].expand(*U.shape[:-1], r))
        new_A = torch.gather(Vh, -2, idx[..., :, None].expand(*idx.shape, Vh.shape[-1]))
        f.sign_B = torch.where(take[..., None, :], hard_sign(new_B), f.sign_B)
        f.sign_A = torch.where(take[..., :, None], hard_sign(new_A), f.sign_A)
        dead = dead & ~take
        f.m = torch.where(take.any(-1, keepdim=True), ls_scale_mid(t, f, ~dead), f.m)  # finished layers left as is
    return f


def factors_from_svid(B: torch.Tensor, A: torch.Tensor) -> Factors:
    """Signs and scales from SVID of each factor of ``T = B A``: ``B ≈ diag(u_B) S_B diag(v_B)``,
    ``A ≈ diag(u_A) S_A diag(v_A)`` ⇒ ``a = u_B``, ``m = v_B ⊙ u_A``, ``b = v_A`` (exact iff both
    factors have ``ρ = 0``)."""
    u_B, S_B, v_B = svid(B)
    u_A, S_A, v_A = svid(A)
    return Factors(sign_A=S_A, sign_B=S_B, b=v_A, m=v_B * u_A, a=u_B)
