"""The solver's start: the balanced SVD pair and the rotation gauge."""

import torch

from lordba.convert.factorize import Target, factor_svd, rmr
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
