"""The factorisation math, checked against independent dense computations (float64)."""

import pytest
import torch

from lordba.convert.factorize import (
    Factors,
    Target,
    factor_svd,
    ls_scale_in,
    ls_scale_mid,
    ls_scale_out,
    objective,
    relative_error,
    rmr,
    svd_init,
    svid,
)

D64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_factors(L, out, inn, r, seed=0):
    g = gen(seed)
    sign = lambda *s: torch.where(torch.randn(*s, generator=g) >= 0, 1.0, -1.0).to(D64)  # noqa: E731
    return Factors(
        sign_A=sign(L, r, inn),
        sign_B=sign(L, out, r),
        b=torch.rand(L, inn, generator=g, dtype=D64) + 0.1,
        m=torch.randn(L, r, generator=g, dtype=D64),
        a=torch.randn(L, out, generator=g, dtype=D64),
    )


def dense(f):
    """Independent reconstruction diag(a) S_B diag(m) S_A diag(b)."""
    return torch.diag_embed(f.a) @ f.sign_B @ torch.diag_embed(f.m) @ f.sign_A @ torch.diag_embed(f.b)


def test_rmr_matches_the_dense_definition_and_known_values():
    g = gen(0)
    F = torch.randn(3, 60, 7, generator=g, dtype=D64)
    s1 = torch.linalg.svdvals(F.abs())[..., 0]
    expected = (1 - s1**2 / F.pow(2).sum((-2, -1))).sqrt()
    torch.testing.assert_close(rmr(F), expected)
    torch.testing.assert_close(rmr(F.mT), expected)  # the wide orientation goes through the other Gram
    # sign × non-negative rank-1 envelope: exactly representable
    u, v = torch.rand(50, 1, generator=g) + 0.1, torch.rand(1, 9, generator=g) + 0.1
    S = torch.where(torch.randn(50, 9, generator=g) >= 0, 1.0, -1.0)
    assert rmr(u * S * v) < 1e-6
    assert rmr(torch.zeros(4, 4)) == 0
    # large i.i.d. matrices approach the population values sqrt(1 - 2/pi) and 1/2
    assert abs(rmr(torch.randn(4096, 16, generator=g)) - 0.603) < 0.03
    assert abs(rmr(torch.rand(4096, 16, generator=g) * 2 - 1) - 0.5) < 0.03


def test_svid_is_the_best_sign_times_rank1_envelope():
    g = gen(1)
    F = torch.randn(2, 40, 12, generator=g, dtype=D64)
    u, S, v = svid(F)
    assert (u >= 0).all() and (v >= 0).all()
    assert torch.equal(S, torch.where(F >= 0, 1.0, -1.0).to(D64))
    approx = u[..., :, None] * S * v[..., None, :]
    # ‖F − diag(u) S diag(v)‖ = ‖|F| − u vᵀ‖ = ρ(F) ‖F‖ (Eckart–Young on |F|)
    err = (F - approx).norm(dim=(-2, -1)) / F.norm(dim=(-2, -1))
    torch.testing.assert_close(err, rmr(F))
    # sign ambiguity: a matrix and its negative give the same non-negative envelope
    u2, S2, v2 = svid(-F)
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(v2, v)
    assert torch.equal(S2, torch.where(-F >= 0, 1.0, -1.0).to(D64))


def test_factor_svd_equals_the_svd_of_the_product_and_is_canonical():
    g = gen(2)
    P = torch.randn(3, 70, 5, generator=g, dtype=D64)
    Q = torch.randn(3, 5, 40, generator=g, dtype=D64)
    U, s, Vh = factor_svd(P, Q)
    torch.testing.assert_close(s, torch.linalg.svdvals(P @ Q)[..., :5])
    torch.testing.assert_close(U @ torch.diag_embed(s) @ Vh, P @ Q)
    torch.testing.assert_close(U.mT @ U, torch.eye(5, dtype=D64).expand(3, 5, 5))
    idx = U.abs().argmax(dim=-2)
    assert (torch.gather(U, -2, idx[..., None, :]) > 0).all()
    U2, _, Vh2 = factor_svd(-P, -Q)  # same product, different factors: same canonical vectors
    torch.testing.assert_close(U2, U)
    torch.testing.assert_close(Vh2, Vh)


def test_objective_is_the_dense_frobenius_error():
    g = gen(3)
    t = Target.of(torch.randn(4, 33, 6, generator=g, dtype=D64), torch.randn(4, 6, 21, generator=g, dtype=D64))
    f = random_factors(4, 33, 21, 5)
    expected = (t.P @ t.Q - dense(f)).pow(2).sum((-2, -1))
    torch.testing.assert_close(objective(t, f), expected)
    torch.testing.assert_close(t.norm2, (t.P @ t.Q).pow(2).sum((-2, -1)))
    torch.testing.assert_close(relative_error(t, f), expected.sqrt() / (t.P @ t.Q).norm(dim=(-2, -1)))


def test_least_squares_scales_match_dense_solutions():
    g = gen(4)
    t = Target.of(torch.randn(2, 25, 4, generator=g, dtype=D64), torch.randn(2, 4, 18, generator=g, dtype=D64))
    f = random_factors(2, 25, 18, 6, seed=5)
    T = t.P @ t.Q
    # a: row i of D is a_i M_i with M = S_B diag(m) S_A diag(b)
    M = f.sign_B @ torch.diag_embed(f.m) @ f.sign_A @ torch.diag_embed(f.b)
    torch.testing.assert_close(ls_scale_out(t, f), (T * M).sum(-1) / (M * M).sum(-1))
    # b: column j of D is b_j N_j with N = diag(a) S_B diag(m) S_A
    N = torch.diag_embed(f.a) @ f.sign_B @ torch.diag_embed(f.m) @ f.sign_A
    torch.testing.assert_close(ls_scale_in(t, f), (T * N).sum(-2) / (N * N).sum(-2))
    # m: D = Σ_k m_k (a ⊙ S_B[:, k]) (S_A[k] ⊙ b)ᵀ, a linear least-squares problem in m
    cols = torch.stack(
        [
            ((f.a * f.sign_B[..., k])[..., :, None] * (f.sign_A[..., k, :] * f.b)[..., None, :]).flatten(-2)
            for k in range(6)
        ],
        -1,
    )
    m_dense = torch.linalg.lstsq(cols, T.flatten(-2)[..., None]).solution[..., 0]
    torch.testing.assert_close(ls_scale_mid(t, f), m_dense, rtol=1e-8, atol=1e-8)
    # each update lowers the objective
    before = objective(t, f)
    for update, name in ((ls_scale_out, "a"), (ls_scale_in, "b"), (ls_scale_mid, "m")):
        setattr(f, name, update(t, f))
        after = objective(t, f)
        assert (after <= before + 1e-9).all()
        before = after


def test_eq7_is_exact_for_a_rank1_delta():
    g = gen(6)
    u, v = torch.randn(1, 30, 1, generator=g, dtype=D64), torch.randn(1, 1, 22, generator=g, dtype=D64)
    t = Target.of(3.0 * u, v)
    f = svd_init(t, 1)
    torch.testing.assert_close(dense(f), t.P @ t.Q, rtol=1e-12, atol=1e-12)
    # the Gram identity resolves a relative error down to about sqrt(float64 eps) ≈ 1e-8
    assert relative_error(t, f) < 1e-7


@pytest.mark.parametrize("r", [3, 6])
def test_eq7_sets_m_to_the_top_singular_values(r):
    g = gen(7)
    t = Target.of(torch.randn(2, 40, 6, generator=g, dtype=D64), torch.randn(2, 6, 35, generator=g, dtype=D64))
    f = svd_init(t, r)
    torch.testing.assert_close(f.m, torch.linalg.svdvals(t.P @ t.Q)[..., :r])
    U = torch.linalg.svd(t.P @ t.Q).U
    # signs of the leading singular vectors, up to the per-component sign of the SVD
    for k in range(r):
        same = (f.sign_B[..., k] == torch.where(U[..., k] >= 0, 1.0, -1.0)).all(-1)
        flipped = (f.sign_B[..., k] == torch.where(-U[..., k] >= 0, 1.0, -1.0)).all(-1)
        assert (same | flipped).all()


def test_rank_above_the_target_rank_fills_from_the_residual():
    g = gen(8)
    t = Target.of(torch.randn(1, 64, 4, generator=g, dtype=D64), torch.randn(1, 4, 48, generator=g, dtype=D64))
    errors = [relative_error(t, svd_init(t, r)).item() for r in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2]  # Eq. 7 alone would leave the extra components at m = 0
    assert svd_init(t, 16).r == 16


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_eq7_fills_the_components_beyond_an_exactly_low_rank_delta_from_the_residual(dtype):
    """A rank-2 ΔW held by a rank-16 LoRA, r = 16: the SVD's 14 zero singular values came out as rounding
    noise and Eq. 7 spent 14 components on it (m ≈ 0, init error 0.47); they are filled from the residual,
    as for the same ΔW held by a rank-2 LoRA (0.26)."""
    g = gen(10)
    A2, B2 = torch.randn(1, 2, 40, generator=g, dtype=D64), torch.randn(1, 48, 2, generator=g, dtype=D64)
    M, rest = torch.randn(1, 2, 14, generator=g, dtype=D64), torch.randn(1, 14, 40, generator=g, dtype=D64)
    A16, B16 = torch.cat([A2, rest], -2), torch.cat([B2, B2 @ M], -1)  # B16 A16 = B2 (A2 + M rest): rank 2
    t2 = Target.of(B2.to(dtype), (A2 + M @ rest).to(dtype))
    low = relative_error(t2, svd_init(t2, 16))
    t = Target.of(B16.to(dtype), A16.to(dtype))
    f = svd_init(t, 16)
    assert relative_error(t, f).item() < 0.5
    assert relative_error(t, f).item() == pytest.approx(low.item(), rel=0.05)
    assert (f.m.abs() > 1e-3 * f.m.abs().max()).sum() >= 8  # most components carry weight


def test_top_eigvec_falls_back_to_a_jittered_problem_when_lapack_fails(monkeypatch):
    from lordba.convert import factorize

    M = torch.rand(3, 12, 5, generator=torch.Generator().manual_seed(0))
    G = M.mT @ M
    want = factorize._top_eigvec(G)
    real, calls = torch.linalg.eigh, []

    def flaky(x):
        calls.append(x)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
        return real(x)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    got = factorize._top_eigvec(G)
    assert len(calls) == 2 and got.dtype == torch.float64
    assert torch.allclose(got.abs(), want.abs(), atol=1e-9)
