"""The solver's start: the balanced SVD pair and the rotation gauge."""

import torch

from lordba.convert.factorize import Target, factor_svd, factors_from_svid, ls_scale_mid, objective, rmr
from lordba.convert.gauge import balanced_pair, initial_factors, rotation_to_lower_rmr

D64 = torch.float64


def test_balanced_pair_splits_each_singular_value_evenly():
    g = torch.Generator().manual_seed(0)
    P, Q = torch.randn(2, 30, 5, generator=g, dtype=D64), torch.randn(2, 5, 20, generator=g, dtype=D64)
    U, sigma, Vh = factor_svd(P, Q)
    B, A = balanced_pair((U, sigma, Vh), 3)
    torch.testing.assert_close(B @ A, U[..., :3] @ torch.diag_embed(sigma[..., :3]) @ Vh[..., :3, :])
    torch.testing.assert_close(B.norm(dim=-2), A.norm(dim=-1))  # ‖B e_j‖ = ‖e_jᵀ A‖ = √σ_j
    assert balanced_pair((U, sigma, Vh), 9)[0].shape[-1] == 5  # not above the rank


def test_the_rotation_gauge_lowers_the_seeding_pairs_rmr():
    """A Gaussian pair: the rotation found lowers ρ(BG)² + ρ(GᵀA)² below the SVD pair's (never above: the identity
    is among the iterates), and the rotation gauge starts from it."""
    g = torch.Generator().manual_seed(1)
    P, Q = torch.randn(1, 60, 6, generator=g, dtype=D64), torch.randn(1, 6, 50, generator=g, dtype=D64)
    B, A = balanced_pair(factor_svd(P, Q), 6)
    G = rotation_to_lower_rmr(B, A, steps=30)
    torch.testing.assert_close(G.mT @ G, torch.eye(6, dtype=D64).expand(1, 6, 6))
    before = rmr(B) ** 2 + rmr(A) ** 2
    after = rmr(B @ G) ** 2 + rmr(G.mT @ A) ** 2
    assert (after < before - 1e-3).all()
    _, rho_A, rho_B, used = initial_factors(Target.of(P, Q), 6, "rotation", rotation_steps=30)
    assert used == "rotation"
    torch.testing.assert_close(rho_A**2 + rho_B**2, after)


def _seed_loss(B, A, G):
    """``ρ(BG)² + ρ(GᵀA)²``: what the rotation lowers."""
    return rmr(B @ G) ** 2 + rmr(G.mT @ A) ** 2


def test_the_rotation_returned_is_the_best_iterate():
    """With a large step Adam's iterates go up and down; the result after ``k`` steps is the best of the first
    ``k + 1`` iterates (the identity first), so its loss never rises with ``k`` and always ends below the start."""
    g = torch.Generator().manual_seed(6)
    P, Q = torch.randn(2, 24, 4, generator=g, dtype=D64), torch.randn(2, 4, 20, generator=g, dtype=D64)
    B, A = balanced_pair(factor_svd(P, Q), 4)
    losses = torch.stack([_seed_loss(B, A, rotation_to_lower_rmr(B, A, steps=k, lr=0.8)) for k in range(13)])
    torch.testing.assert_close(losses[0], _seed_loss(B, A, torch.eye(4, dtype=D64).expand(2, 4, 4)))
    assert (losses[1:] <= losses[:-1]).all(), losses.T
    assert (losses[-1] < losses[0] - 1e-3).all()


def _low_rank_target(noise: float) -> Target:
    """``ΔW = P Q`` 40×30 from k = 3 factors with singular values 1, 0.6 and ``noise`` (and ``eps = 1e-6``:
    the tolerance is ``size · eps · σ₁ = 4e-5``, with ``size = max(out, in, k) = 40``)."""
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=D64))[0]
    V = torch.linalg.qr(torch.randn(30, 3, generator=g, dtype=D64))[0]
    sigma = torch.tensor([1.0, 0.6, noise], dtype=D64)
    return Target.of((U * sigma)[None], V.mT[None], eps=1e-6)


def test_components_below_the_noise_tolerance_leave_the_seeding_pair_unchanged():
    """A third singular value of 3e-5 σ₁ is above ``eps · σ₁`` but below ``size · eps · σ₁``: it is noise, seeded
    empty, so the seeding pair (and its RMR) at r = 3 is the one at r = 2, for the SVD and the rotation gauge;
    one of 1e-3 σ₁ is not noise, and changes it. The factors still have rank 3 (filled from the residual)."""
    for gauge in ("svd", "rotation"):
        t = _low_rank_target(3e-5)
        _, rho_A2, rho_B2, _ = initial_factors(t, 2, gauge, rotation_steps=20)
        f, rho_A3, rho_B3, _ = initial_factors(t, 3, gauge, rotation_steps=20)
        torch.testing.assert_close((rho_A3, rho_B3), (rho_A2, rho_B2), rtol=1e-9, atol=1e-12)
        assert f.r == 3 and bool((f.m != 0).all())
        t = _low_rank_target(1e-3)
        _, rho_A2, rho_B2, _ = initial_factors(t, 2, gauge, rotation_steps=20)
        _, rho_A3, rho_B3, _ = initial_factors(t, 3, gauge, rotation_steps=20)
        assert not torch.allclose(torch.stack([rho_A3, rho_B3]), torch.stack([rho_A2, rho_B2]), rtol=1e-6, atol=0)


def test_the_rotation_gauges_scales_are_least_squares():
    """The rotated pair's SVID scales are refitted: ``m`` (fitted last) is the least-squares ``m`` for the signs and
    the other scales, and the start is better than the raw SVID of the rotated pair."""
    g = torch.Generator().manual_seed(4)
    P, Q = torch.randn(2, 30, 4, generator=g, dtype=D64), torch.randn(2, 4, 26, generator=g, dtype=D64)
    t = Target.of(P, Q)
    f, _, _, _ = initial_factors(t, 4, "rotation", rotation_steps=20)
    torch.testing.assert_close(ls_scale_mid(t, f), f.m)
    B, A = balanced_pair(factor_svd(P, Q), 4)
    G = rotation_to_lower_rmr(B, A, steps=20)
    assert (objective(t, f) < objective(t, factors_from_svid(B @ G, G.mT @ A))).all()
