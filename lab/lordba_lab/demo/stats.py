"""Confidence intervals for the sweep: a two-level bootstrap over seeds and held-out examples.

Every point of ``lordba reproduce`` is evaluated on one fixed held-out set, per example: the
completion's summed cross-entropy and token count, and whether the greedy answer scored. A point's
statistic over ``k`` seeds is the mean over seeds of its held-out loss (token-weighted) or exact match.
One bootstrap draw resamples the seeds (``k`` of ``k``, with replacement) and the examples (``n`` of
``n``); the same draws serve every point, so a *difference* between two points is paired: same
seeds (the same trained LoRA under each seed's conversions) and same examples. 95% intervals are
the 2.5 and 97.5 percentiles of the draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRAWS = 2000


@dataclass(frozen=True)
class Draws:
    """Shared resampling: seed positions ``(draws, k)`` and example weights ``(draws, n)`` (counts)."""

    seeds: np.ndarray
    weights: np.ndarray

    @classmethod
    def make(cls, k: int, n: int, draws: int = DRAWS, seed: int = 0) -> Draws:
        rng = np.random.default_rng(seed)
        seeds = rng.integers(0, k, size=(draws, k))
        picks = rng.integers(0, n, size=(draws, n))
        weights = np.zeros((draws, n))
        np.add.at(weights, (np.arange(draws)[:, None], picks), 1.0)
        return cls(seeds, weights)


def _per_seed(points: list[dict], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(numerator, denominator)`` per seed and example, ``(k, n)`` each, for ``key`` in ("loss", "metric")."""
    details = [p.get("per_example") for p in points]
    if any(d is None for d in details):
        return None
    if key == "loss":
        return np.array([d["loss_sum"] for d in details]), np.array([d["tokens"] for d in details], dtype=float)
    if any("correct" not in d for d in details):
        return None
    correct = np.array([[c == "1" for c in d["correct"]] for d in details], dtype=float)
    return correct, np.ones_like(correct)


def draws_of(points: list[dict], key: str, draws: Draws) -> np.ndarray | None:
    """The statistic (mean over seeds of loss or exact match) under each draw; ``points`` are one
    series' points, one per seed, in the seed order ``draws`` was made for (a single point: the seeds
    are not resampled). ``None`` without per-example results."""
    pair = _per_seed(points, key)
    if pair is None:
        return None
    num, den = pair
    per_seed = (draws.weights @ num.T) / np.maximum(draws.weights @ den.T, 1e-12)  # (draws, k)
    if per_seed.shape[1] == 1:
        return per_seed[:, 0]
    return np.take_along_axis(per_seed, draws.seeds, axis=1).mean(axis=1)


def interval(values: np.ndarray) -> tuple[float, float]:
    """The central 95% interval of bootstrap draws."""
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def compact_details(details: dict) -> dict:
    """Per-example results in a small JSON form: losses rounded, correctness as a '0'/'1' string."""
    out = {"loss_sum": [round(x, 5) for x in details["loss_sum"]], "tokens": list(details["tokens"])}
    if "correct" in details:
        out["correct"] = "".join("1" if c else "0" for c in details["correct"])
    return out
