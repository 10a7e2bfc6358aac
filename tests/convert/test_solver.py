"""The PTQ solver: monotone, exact where the theory says so, never worse than the baselines."""

import itertools

import pytest
import torch

from lordba.convert import SolverOptions, convert_factors, convert_factors_batched
from lordba.convert.factorize import Target, objective, relative_error, rmr, svd_init
from lordba.convert.groups import solve_group
from lordba.convert.solver import iterate, sign_sweeps
from lordba.core.scales import get_codec
from lordba.errors import ConversionError

D64 = torch.float64


def structured(rows, cols, g):
    """An exactly representable factor: sign × non-negative rank-1 envelope (RMR 0)."""
    u = torch.rand(rows, 1, generator=g, dtype=D64) + 0.5
    v = torch.rand(1, cols, generator=g, dtype=D64) + 0.5
    return u * torch.where(torch.randn(rows, cols, generator=g) >= 0, 1.0, -1.0).to(D64) * v


def naive_error(A, B):
    """Per-factor sign × mean-|·| (BitDelta-style) baseline."""
    Bn = torch.where(B >= 0, 1.0, -1.0).to(B.dtype) * B.abs().mean()
    An = torch.where(A >= 0, 1.0, -1.0).to(A.dtype) * A.abs().mean()
    return ((B @ A - Bn @ An).norm() / (B @ A).norm()).item()


def test_theory_check_error_follows_the_factors_rmr():
    """Factors = sign × rank-1 magnitude + noise of growing size: exact at RMR 0, error increasing
    with RMR, and always below the naive per-factor baseline and the solver's own start."""
    g = torch.Generator().manual_seed(0)
    out, inn, k = 160, 120, 6
    B0, A0 = structured(out, k, g), structured(k, inn, g)
    NB, NA = torch.randn(out, k, generator=g, dtype=D64), torch.randn(k, inn, generator=g, dtype=D64)
    rows = []
    for eps in (0.0, 0.05, 0.2, 0.5, 1.0, 3.0):
        B = B0 + eps * B0.abs().mean() * NB
        A = A0 + eps * A0.abs().mean() * NA
        res = convert_factors(A, B, k, options=SolverOptions(dtype="float64"))
        rows.append((max(res.rmr_A, res.rmr_B), res.rel_error, res.rel_error_init, naive_error(A, B)))
    assert rows[0][0] < 1e-6 and rows[0][1] < 1e-6  # RMR 0 → exact (from the SVD gauge, whose init is not)
    assert rows[0][2] > 0.1
    rmrs = [r[0] for r in rows]
    errors = [r[1] for r in rows]
    assert rmrs == sorted(rmrs) and errors == sorted(errors)
    for _, err, init, naive in rows:
        assert err <= init + 1e-9
        assert err < naive
    # and the error is of the order of the RMR (≈ ρ_A + ρ_B at small RMR)
    for rho, err, _, _ in rows[1:3]:
        assert err < 3 * rho


def test_each_iteration_is_monotone_and_signs_end_at_a_local_minimum():
    g = torch.Generator().manual_seed(1)
    t = Target.of(torch.randn(3, 90, 8, generator=g), torch.randn(3, 8, 70, generator=g))
    f = svd_init(t, 8)
    values = [objective(t, f)]
    for _ in range(8):
        iterate(t, f)
        values.append(objective(t, f))
    for before, after in itertools.pairwise(values):
        assert (after <= before * (1 + 1e-6)).all()
    assert (values[-1] < values[0] * 0.99).all()


def test_sign_sweeps_reach_a_single_flip_local_minimum_of_the_binary_quadratic():
    g = torch.Generator().manual_seed(2)
    L, n, r = 2, 50, 5
    X = torch.randn(L, r, 3 * r, generator=g, dtype=D64)
    H = X @ X.mT
    C = torch.randn(L, n, r, generator=g, dtype=D64) * 3
    W = torch.rand(L, n, generator=g, dtype=D64)
    S0 = torch.where(torch.randn(L, n, r, generator=g) >= 0, 1.0, -1.0).to(D64)

    def f(S):
        return -2 * (S * C).sum(-1) + W * ((S @ H) * S).sum(-1)

    S = sign_sweeps(S0.mT, C.mT, W, H).mT  # coordinate-major layout [L, r, n]
    assert (f(S) <= f(S0) + 1e-12).all()
    for k in range(r):
        flipped = S.clone()
        flipped[..., k] *= -1
        assert (f(flipped) >= f(S) - 1e-9).all()
    # brute force on a few rows: coordinate descent reaches the optimum or a close local minimum
    patterns = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=r)), dtype=D64)
    for i in range(5):
        vals = -2 * patterns @ C[0, i] + W[0, i] * ((patterns @ H[0]) * patterns).sum(-1)
        assert f(S)[0, i] >= vals.min() - 1e-9


def test_solver_beats_the_closed_form_on_gaussian_lora_and_rank_changes_work():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(8, 200, generator=g), torch.randn(150, 8, generator=g)
    closed = convert_factors(A, B, 8, options=SolverOptions(method="init"))
    solved = convert_factors(A, B, 8)
    assert solved.rel_error < closed.rel_error - 0.01
    assert abs(closed.rel_error - closed.rel_error_init) < 1e-3  # fp16 storage barely changes the error
    errors = [convert_factors(A, B, r).rel_error for r in (2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True)
    assert convert_factors(A, B, 16).sign_A.shape == (16, 200)


@pytest.mark.parametrize("method", ["admm", "admm+bcd"])
def test_admm_variants_improve_on_the_closed_form(method):
    g = torch.Generator().manual_seed(4)
    A, B = torch.randn(8, 120, generator=g), torch.randn(100, 8, generator=g)
    init = convert_factors(A, B, 8, options=SolverOptions(method="init")).rel_error
    assert convert_factors(A, B, 8, options=SolverOptions(method=method, admm_iters=30)).rel_error < init


@pytest.mark.parametrize("gauge", ["lora", "rotation", "best"])
def test_other_gauges_are_valid_starts(gauge):
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(6, 80, generator=g), torch.randn(90, 6, generator=g)
    res = convert_factors(A, B, 6, options=SolverOptions(gauge=gauge, rotation_steps=20))
    assert res.rel_error <= res.rel_error_init + 1e-4 and res.rel_error < 0.9
    if gauge == "lora":
        assert res.rmr_A_gauge == pytest.approx(res.rmr_A) and res.rmr_B_gauge == pytest.approx(res.rmr_B)
    if gauge == "rotation":  # the rotation never raises the seeding pair's RMR above the SVD pair's
        svd = convert_factors(A, B, 6, options=SolverOptions(method="init"))
        assert res.rmr_A_gauge**2 + res.rmr_B_gauge**2 <= svd.rmr_A_gauge**2 + svd.rmr_B_gauge**2 + 1e-9


@pytest.mark.parametrize("held", ["zero-padded", "mixed"])
def test_rotation_gauge_fills_the_components_beyond_an_exactly_low_rank_delta_from_the_residual(held):
    """A rank-2 ΔW held by a rank-16 LoRA (extra components zero, or mixed into the first two), r = 16: the
    rotation gauge seeded 14 components from the SVD's rounding noise (zero-padded: start 0.53 and BCD's end
    0.52 where the same ΔW held by a rank-2 LoRA gives 0.28 and 0.14). They are filled from the residual, as
    the svd gauge does, so both LoRAs convert alike."""
    g = torch.Generator().manual_seed(10)
    A2, B2 = torch.randn(2, 40, generator=g, dtype=D64), torch.randn(48, 2, generator=g, dtype=D64)
    M, rest = torch.randn(2, 14, generator=g, dtype=D64), torch.randn(14, 40, generator=g, dtype=D64)
    if held == "zero-padded":
        A16, B16 = torch.cat([A2, rest]), torch.cat([B2, torch.zeros(48, 14, dtype=D64)], -1)
    else:  # B16 A16 = B2 (A2 + M rest): rank 2
        A16, B16, A2 = torch.cat([A2, rest]), torch.cat([B2, B2 @ M], -1), A2 + M @ rest
    opts = SolverOptions(gauge="rotation", method="bcd", rotation_steps=20)
    low = convert_factors(A2.float(), B2.float(), 16, scale_dtype="float32", options=opts)
    res = convert_factors(A16.float(), B16.float(), 16, scale_dtype="float32", options=opts)
    assert res.rel_error_init == pytest.approx(low.rel_error_init, rel=0.02)
    assert res.rel_error == pytest.approx(low.rel_error, rel=0.05) and res.rel_error < 0.3


@pytest.mark.parametrize("gauge", ["svd", "rotation"])
def test_float32_lora_factors_solved_in_float64_cut_their_own_rounding_tail(gauge):
    """A rank-2 ΔW held by rank-16 float32 LoRA factors, solved with dtype float64: its 14 extra singular values
    are float32's rounding (1e-7 relative), under float32's tolerance but far above float64's, which read them as
    signal. Eq. 7 spent 14 components on that noise (start 0.47 where dtype float32 gives 0.24); the tolerance is
    the factors' own, so both working dtypes start alike."""
    g = torch.Generator().manual_seed(10)
    A2, B2 = torch.randn(2, 40, generator=g, dtype=D64), torch.randn(48, 2, generator=g, dtype=D64)
    M, rest = torch.randn(2, 14, generator=g, dtype=D64), torch.randn(14, 40, generator=g, dtype=D64)
    A16, B16 = torch.cat([A2, rest]).float(), torch.cat([B2, B2 @ M], -1).float()
    starts = [
        convert_factors(A16, B16, 16, options=SolverOptions(gauge=gauge, method="init", dtype=dtype, rotation_steps=20))
        for dtype in ("float32", "float64")
    ]
    assert starts[1].rel_error_init == pytest.approx(starts[0].rel_error_init, rel=0.02)
    assert starts[1].rel_error_init < 0.3


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "int8"])
def test_scaling_convention_and_stored_scales(scale_dtype):
    g = torch.Generator().manual_seed(6)
    A, B = torch.randn(4, 60, generator=g) * 0.01, torch.randn(50, 4, generator=g) * 0.01
    scaling, lordba_scaling = 16 / 2.0, 0.5  # e.g. rsLoRA alpha/√r vs LoRDBA alpha/r
    res = convert_factors(A, B, 4, scaling, lordba_scaling, scale_dtype=scale_dtype)
    target = scaling * B.double() @ A.double()
    got = res.delta_weight(lordba_scaling).double()
    assert abs((target - got).norm().item() / target.norm().item() - res.rel_error) < 1e-4
    codec = get_codec(scale_dtype)
    b, m, a = codec.fake_quant(res.scale_in, res.scale_mid, res.scale_out)  # already exactly storable
    assert torch.equal(b, res.scale_in) and torch.equal(m, res.scale_mid) and torch.equal(a, res.scale_out)
    assert set(res.sign_A.unique().tolist()) <= {-1.0, 1.0} and res.sign_A.dtype == torch.float32


def test_batched_equals_single_and_is_deterministic():
    g = torch.Generator().manual_seed(7)
    A, B = torch.randn(3, 5, 70, generator=g), torch.randn(3, 60, 5, generator=g)
    batch = convert_factors_batched(
        A, B, 5, scaling=torch.tensor([1.0, 2.0, 0.5]), options=SolverOptions(dtype="float64")
    )
    again = convert_factors_batched(
        A, B, 5, scaling=torch.tensor([1.0, 2.0, 0.5]), options=SolverOptions(dtype="float64")
    )
    for x, y in zip(batch, again):
        assert torch.equal(x.sign_A, y.sign_A) and torch.equal(x.scale_mid, y.scale_mid)
    single = convert_factors(A[1], B[1], 5, 2.0, options=SolverOptions(dtype="float64"))
    assert single.rel_error == pytest.approx(batch[1].rel_error, abs=1e-6)


def test_activation_weighting_lowers_the_weighted_error():
    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(6, 100, generator=g), torch.randn(80, 6, generator=g)
    moments = torch.rand(100, generator=g) ** 6 * 100  # a few dominant input channels
    plain = convert_factors(A, B, 6, scale_dtype="float16")
    weighted = convert_factors(A, B, 6, scale_dtype="float16", input_moments=moments)
    w = moments.double().sqrt()
    T = B.double() @ A.double()

    def werr(res):
        return ((T - res.delta_weight().double()) * w).norm().item() / (T * w).norm().item()

    assert werr(weighted) == pytest.approx(weighted.rel_error_weighted, abs=1e-4)
    assert werr(weighted) < werr(plain) - 0.02
    assert weighted.rel_error > plain.rel_error  # the unweighted error is what it trades


def test_init_error_of_a_weighted_conversion_is_the_starts_error_of_dw():
    """With calibration the report's "init err" was the start's *weighted* error beside the unweighted
    "rel err" (0.648 against 0.678 on a tiny Llama layer: the solver looked worse than its start)."""
    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(6, 100, generator=g), torch.randn(80, 6, generator=g)
    moments = torch.rand(100, generator=g) ** 6 * 100
    start = convert_factors(A, B, 6, input_moments=moments, options=SolverOptions(method="init", dtype="float64"))
    res = convert_factors(A, B, 6, input_moments=moments, options=SolverOptions(dtype="float64"))
    assert abs(start.rel_error - start.rel_error_weighted) > 0.01  # the two errors differ here
    assert res.rel_error_init == pytest.approx(start.rel_error, abs=1e-6)
    assert start.rel_error_init == pytest.approx(start.rel_error, abs=1e-6)


def test_near_exact_fits_are_compared_in_float64():
    """A LoRA that is a LoRDBA adapter exported (exactly representable), solved in float32: gauge="best" kept
    the svd gauge's 1.1e-4 over the lora gauge's 2e-7, and ADMM's 2.3e-4 replaced the lora gauge's exact start
    (their float32 errors were cancellation noise)."""
    g = torch.Generator().manual_seed(5)
    SA, SB = torch.randn(8, 64, generator=g).sign(), torch.randn(48, 8, generator=g).sign()
    a, b, m = (torch.rand(n, generator=g) + 0.5 for n in (48, 64, 8))
    B, A = a[:, None] * SB * m[None], SA * b[None]
    err = {
        gauge: convert_factors(A, B, 8, options=SolverOptions(gauge=gauge)).rel_error
        for gauge in ("svd", "lora", "best")
    }
    # both gauges may end at float32's rounding (~2e-7, the svd gauge since its stop test is in float64): either
    assert err["best"] <= min(err["svd"], err["lora"]) + 1e-7 and err["best"] < 1e-6
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(8, 64, generator=g), torch.randn(48, 8, generator=g)
    A, B = A.sign() * A.abs().mean(), B.sign() * 0.3
    res = convert_factors(A, B, 8, options=SolverOptions(gauge="lora"))
    assert res.rel_error < 1e-5 and res.rel_error_init < 1e-5


@pytest.mark.parametrize("method", ["bcd", "admm+bcd"])
def test_float32_solver_converges_on_an_exactly_representable_delta(method):
    """Both factors sign × rank-1 envelope (RMR 0), solved in float32 from the svd gauge (init error 0.65):
    the stop test read the objective's float32 cancellation noise and stopped at 3.2e-4 (bcd) / 7e-5
    (admm+bcd) where float64 reaches 0; it is computed in float64, and float32 gets to ~3e-7."""
    g = torch.Generator().manual_seed(0)
    B, A = structured(160, 6, g).float(), structured(6, 120, g).float()
    res = convert_factors(A, B, 6, options=SolverOptions(method=method))
    assert res.rel_error_init > 0.5
    assert res.rel_error < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_solution_does_not_depend_on_the_magnitude_of_dw(dtype):
    """ΔW scaled by 1e-20 (and 1e19) gets the error of the unscaled ΔW: at 1e-18 ADMM's absolute floor on its
    Gram scale took over (0.585 for 0.559, float64 too), and in float32 the Grams fell below the normal range;
    at 1e19 float32 gave NaN. The solve runs on T / ‖T‖."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 40, generator=g), torch.randn(48, 4, generator=g)
    opts = SolverOptions(dtype=dtype)
    want = convert_factors(A, B, 4, options=opts).rel_error
    for s in (1e-20, 1e19):
        res = convert_factors(A * s**0.5, B * s**0.5, 4, scale_dtype="int8", options=opts)
        assert res.rel_error == pytest.approx(want, abs=1e-3)


def test_zero_lora_and_exact_int8_group():
    A, B = torch.zeros(2, 3, 16), torch.zeros(2, 20, 3)
    res = solve_group(B, A, 3, torch.ones(2, dtype=D64), get_codec("int8"), SolverOptions())
    assert torch.isfinite(res.factors.m).all() and (res.rel_error == 0).all()
    assert rmr(A).eq(0).all()


@pytest.mark.parametrize("gauge", ["svd", "lora", "rotation", "best"])
@pytest.mark.parametrize("zero", ["B", "A"])
def test_a_layer_with_a_zero_factor_converts_to_zero_in_every_gauge(gauge, zero):
    """An untrained layer (PEFT's B = 0) or a zero A, batched with a trained one: its ΔW' is 0, its
    error 0, and its neighbour's result is the one it gets alone (the lora gauge gave NaN scales, the
    rotation gauge a LinAlgError)."""
    g = torch.Generator().manual_seed(12)
    A, B = torch.randn(2, 4, 40, generator=g), torch.randn(2, 48, 4, generator=g)
    (B if zero == "B" else A)[1] = 0
    opts = SolverOptions(gauge=gauge, rotation_steps=5)
    both = convert_factors_batched(A, B, 4, scale_dtype="int8", options=opts)
    alone = convert_factors(A[0], B[0], 4, scale_dtype="int8", options=opts)
    for res in both:
        for x in (res.scale_in, res.scale_mid, res.scale_out):
            assert torch.isfinite(x).all()
    assert torch.equal(both[1].delta_weight(), torch.zeros(48, 40)) and both[1].rel_error == 0.0
    assert both[0].rel_error == alone.rel_error and torch.equal(both[0].delta_weight(), alone.delta_weight())


def test_relative_error_reported_is_on_stored_values():
    g = torch.Generator().manual_seed(9)
    A, B = torch.randn(1, 4, 64, generator=g), torch.randn(1, 64, 4, generator=g)
    res = solve_group(B, A, 4, torch.ones(1, dtype=D64), get_codec("int8"), SolverOptions())
    t = Target.of(B.double(), A.double())
    f = res.factors
    from lordba.convert.factorize import Factors

    stored = Factors(*(x.double() for x in (f.sign_A, f.sign_B, f.b, f.m, f.a)))
    assert relative_error(t, stored).item() == pytest.approx(res.rel_error.item(), abs=1e-6)


@pytest.mark.parametrize("s", [1e15, 1e-25])
def test_scales_that_float16_cannot_hold_are_refused(s):
    """A ΔW whose scales overflow float16 (norm 1e15: NaN error, inf scales) or underflow it to zero (1e-25: an
    adapter of ΔW' = 0) was returned without a word; int8 and float32 hold them."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 40, generator=g), torch.randn(48, 4, generator=g)
    with pytest.raises(
        ConversionError, match=r"pair 0: its scales do not fit scale_dtype 'float16'.*'int8' or 'float32'"
    ):
        convert_factors(A * s**0.5, B * s**0.5, 4, scale_dtype="float16")
    assert convert_factors(A * s**0.5, B * s**0.5, 4, scale_dtype="int8").rel_error < 0.6
