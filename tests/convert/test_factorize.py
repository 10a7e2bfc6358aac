"""The factorisation math, checked against independent dense computations (float64)."""

import pytest
import torch

from lordba.convert.factorize import (
    Factors,
    Target,
    factor_svd,
    factors_from_svid,
    ls_scale_in,
    ls_scale_mid,
    ls_scale_out,
    numerical_rank,
    objective,
    relative_error,
    rmr,
    solve_mid,
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
    jitter = calls[1] - G.double()  # the retry is a jittered problem: a small positive diagonal, nothing else
    assert (jitter.diagonal(dim1=-2, dim2=-1) > 0).all() and torch.equal(
        jitter, torch.diag_embed(jitter.diagonal(dim1=-2, dim2=-1))
    )
    assert torch.allclose(got.abs(), want.abs(), atol=1e-9)


def test_svid_envelope_is_non_negative_where_a_column_is_zero():
    """A zero column leaves the top eigenvector's entry there at rounding level, of either sign (negative in 12 of
    these 200): it is clipped, so the envelope stays non-negative (Perron-Frobenius)."""
    F = torch.randn(200, 30, 6, generator=gen(0), dtype=D64)
    for i in range(200):
        F[i, :, i % 6] = 0
    u, _, v = svid(F)
    assert (u >= 0).all() and (v >= 0).all()


def test_objective_of_a_near_exact_fit_is_never_negative():
    """The Gram identity cancels to rounding level for a near-exact fit; the objective is clamped at 0 and the
    relative error stays a number."""
    for seed in range(5):
        f = random_factors(3, 40, 30, 4, seed=seed)
        t = Target.of(f.left(), f.right())
        f.m = f.m * (1 + 1e-12)
        assert (objective(t, f) >= 0).all()
        assert torch.isfinite(relative_error(t, f)).all()


def test_relative_error_of_a_zero_target_is_the_absolute_error():
    """``‖0 − D‖ / 0``: 0 only where D is 0 too, else ``‖D‖`` (never a zero error for a non-zero adapter)."""
    f = random_factors(2, 12, 9, 3, seed=1)
    t = Target.of(torch.zeros(2, 12, 2, dtype=D64), torch.zeros(2, 2, 9, dtype=D64))
    torch.testing.assert_close(relative_error(t, f), dense(f).norm(dim=(-2, -1)))
    f.m = torch.zeros_like(f.m)
    assert (relative_error(t, f) == 0).all()


def test_least_squares_scale_keeps_its_value_where_its_row_of_d_is_zero_or_negligible():
    """Rows 0 and 1 of ``S_B diag(m) S_A`` are exactly 0 (the two components cancel), then 1e-9 of the others: no
    meaningful least-squares scale exists for them, and their previous ``a`` is kept (not 0, not a huge ratio)."""
    g = gen(11)
    sA = torch.where(torch.randn(1, 1, 10, generator=g) >= 0, 1.0, -1.0).to(D64).expand(1, 2, 10).clone()
    sB = torch.tensor([[[1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]]], dtype=D64)
    f = Factors(sign_A=sA, sign_B=sB, b=torch.rand(1, 10, generator=g, dtype=D64) + 0.5,
                m=torch.tensor([[1.0, 1.0]], dtype=D64), a=torch.tensor([[0.7, 0.3, 1.0, 1.0]], dtype=D64))  # fmt: skip
    t = Target.of(torch.randn(1, 4, 3, generator=g, dtype=D64), torch.randn(1, 3, 10, generator=g, dtype=D64))
    a = ls_scale_out(t, f)
    assert a[0, 0] == 0.7  # den exactly 0
    f.m = torch.tensor([[1.0, 1.0 + 1e-9]], dtype=D64)
    a = ls_scale_out(t, f)
    assert a[0, 0] == 0.7 and a[0, 1] == 0.3  # den 1e-18 of the largest row's
    assert torch.isfinite(a).all() and (a[0, 2:] != torch.tensor([1.0, 1.0], dtype=D64)).all()


def test_solve_mid_keeps_the_old_value_where_the_solution_does_not_lower_the_objective():
    """An ill-conditioned system (the ridge moves the solution off the minimiser): the exact minimiser given as
    ``old`` is kept."""
    G = torch.diag(torch.tensor([1.0, 1e-14], dtype=D64))
    h = torch.tensor([1.0, 1e-14], dtype=D64)
    old = torch.tensor([1.0, 1.0], dtype=D64)  # G⁻¹h
    assert torch.equal(solve_mid(G, h, old), old)
    far = torch.tensor([0.0, 0.0], dtype=D64)
    torch.testing.assert_close(solve_mid(G, h, far)[0], torch.tensor(1.0, dtype=D64))


def test_numerical_rank_counts_the_values_above_the_tolerance():
    assert numerical_rank(torch.zeros(2, 3, dtype=D64), 10).tolist() == [0, 0]  # a zero matrix has rank 0
    sigma = torch.tensor([1.0, 1e-3, 1e-17, 0.0], dtype=D64)
    assert int(numerical_rank(sigma, 4)) == 2
    assert int(numerical_rank(sigma, 4, eps=1e-3)) == 1  # the coarser precision of the factors


def test_factors_from_svid_are_exact_for_factors_of_rmr_zero():
    """``B = diag(a) S_B diag(v_B)``, ``A = diag(u_A) S_A diag(b)``: the pair's middle scale is ``v_B ⊙ u_A``."""
    g = gen(12)
    sign = lambda *s: torch.where(torch.randn(*s, generator=g) >= 0, 1.0, -1.0).to(D64)  # noqa: E731
    pos = lambda *s: torch.rand(*s, generator=g, dtype=D64) + 0.5  # noqa: E731
    B = pos(2, 30, 1) * sign(2, 30, 4) * pos(2, 1, 4)
    A = pos(2, 4, 1) * sign(2, 4, 25) * pos(2, 1, 25)
    torch.testing.assert_close(factors_from_svid(B, A).dense(), B @ A)


def test_eq7_keeps_sigma_for_a_full_rank_layer_batched_with_a_rank_deficient_one():
    """Layer 1 (a rank-2 ΔW held at k = 4) has components filled from the residual; layer 0 (rank 4) has none and
    keeps Eq. 7's ``m = σ``."""
    g = gen(13)
    P, Q = torch.randn(2, 40, 4, generator=g, dtype=D64), torch.randn(2, 4, 30, generator=g, dtype=D64)
    P[1, :, 2:] = P[1, :, :2] @ torch.randn(2, 2, generator=g, dtype=D64)
    Q[1, 2:] = 0
    f = svd_init(Target.of(P, Q), 4)
    torch.testing.assert_close(f.m[0], torch.linalg.svdvals(P[0] @ Q[0])[:4])
    assert (f.m[1].abs() > 1e-3 * f.m[1].abs().max()).all()  # the filled components carry weight


def test_eq7_reads_a_component_below_size_times_eps_as_rounding_noise():
    """A third singular value 10 float64 eps of the first, on a 60 x 40 product: under ``max(out, in, k) · eps · σ₁``
    it is noise, and its component is filled from the residual (not left at ``m = σ₃ ≈ 0``)."""
    g = gen(14)
    U = torch.linalg.qr(torch.randn(1, 60, 3, generator=g, dtype=D64))[0]
    V = torch.linalg.qr(torch.randn(1, 40, 3, generator=g, dtype=D64))[0]
    sigma = torch.tensor([[1.0, 0.5, 10 * torch.finfo(D64).eps]], dtype=D64)
    f = svd_init(Target.of(U * sigma[:, None, :], V.mT), 3)
    assert f.m[0, 2].abs() > 1e-3
