"""The sweep's bootstrap: shared draws, per-series statistics and paired differences."""

import numpy as np
import pytest

from lordba_lab.demo.stats import Draws, compact_details, draws_of, interval


def _point(seed, correct, loss_sum, tokens):
    return {"seed": seed, "per_example": compact_details(
        {"correct": correct, "loss_sum": loss_sum, "tokens": tokens})}  # fmt: skip


def test_draws_resample_every_example_count_and_seed_position():
    d = Draws.make(3, 50, draws=200, seed=1)
    assert d.seeds.shape == (200, 3) and d.seeds.min() >= 0 and d.seeds.max() <= 2
    assert d.weights.shape == (200, 50) and (d.weights.sum(axis=1) == 50).all()
    assert Draws.make(3, 50, draws=200, seed=1).weights.tolist() == d.weights.tolist()  # reproducible


def test_exact_match_draws_center_on_the_mean_and_pair_identical_series_to_zero():
    rng = np.random.default_rng(0)
    pts = [_point(s, list(rng.random(400) < 0.7), [1.0] * 400, [2] * 400) for s in range(3)]
    d = Draws.make(3, 400, draws=1000)
    m = draws_of(pts, "metric", d)
    mean = np.mean([p["per_example"]["correct"].count("1") / 400 for p in pts])
    lo, hi = interval(m)
    assert lo < mean < hi and hi - lo < 0.12  # about ±2.3 standard errors of a 0.7 rate, n = 400
    assert interval(m - draws_of(pts, "metric", d)) == (0.0, 0.0)
    loss = draws_of(pts, "loss", d)
    assert np.allclose(loss, 0.5)  # token-weighted: 1.0 per 2 tokens everywhere


def test_paired_difference_of_a_constant_gap_is_that_gap():
    d = Draws.make(2, 30, draws=300)
    a = [_point(s, [True] * 30, [3.0] * 30, [1] * 30) for s in range(2)]
    b = [_point(s, [False] * 30, [2.0] * 30, [1] * 30) for s in range(2)]
    assert interval(draws_of(a, "metric", d) - draws_of(b, "metric", d)) == pytest.approx((1.0, 1.0))
    assert interval(draws_of(a, "loss", d) - draws_of(b, "loss", d)) == pytest.approx((1.0, 1.0))


def test_a_single_point_is_not_resampled_over_seeds_and_missing_details_give_none():
    d = Draws.make(3, 10, draws=50)
    one = [_point(0, [True] * 5 + [False] * 5, [1.0] * 10, [1] * 10)]
    assert draws_of(one, "metric", d).shape == (50,)
    assert draws_of([{"seed": 0}], "loss", d) is None
    no_answers = [{"seed": 0, "per_example": compact_details({"loss_sum": [1.0], "tokens": [1]})}]
    assert draws_of(no_answers, "metric", Draws.make(1, 1, draws=5)) is None
