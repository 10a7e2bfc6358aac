"""Interleaved wall-clock timing for side-by-side comparisons on a shared, noisy machine.

Variants are timed in the same process, one call each per round, with the order rotated every
round, so that slow periods (another process taking a core) hit every variant alike. Reported:
the median and the interquartile range (IQR) of the per-call times, and for a ratio of two
variants also the *paired* ratio: the median of the per-round ratios, each taken between calls
made seconds apart, so drift that moves both variants (thermal or frequency changes, a neighbour
starting) cancels out instead of widening the spread.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Per-call times of one variant, in seconds."""

    median: float
    iqr: float
    n: int
    samples: list[float] = field(default_factory=list, repr=False)

    @property
    def spread(self) -> float:
        """IQR relative to the median."""
        return self.iqr / self.median if self.median > 0 else float("nan")


def stats(samples: list[float]) -> Stats:
    """Median and interquartile range of ``samples`` (fewer than 4: their whole range, the "IQR" of quick runs)."""
    samples = list(samples)
    if len(samples) < 4:
        return Stats(statistics.median(samples), max(samples) - min(samples), len(samples), samples)
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return Stats(statistics.median(samples), q3 - q1, len(samples), samples)


def median_ci(samples: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``samples`` at the level of ``z`` (95% for
    1.96): the order statistics ``x(r)`` and ``x(n+1-r)`` (1-based) for the largest ``r`` whose coverage
    ``P(r <= B <= n-r)``, ``B ~ Binomial(n, 1/2)``, is at least that level (the binomial rule, exact; no
    assumption on the shape of the distribution, independent rounds assumed). Too few samples for the level
    (fewer than 6 at 95%): their whole range."""
    ordered = sorted(samples)
    n = len(ordered)
    level = math.erf(z / math.sqrt(2))
    r, below = 1, 1 + n  # below: 2^n P(B <= r), what x(r+1) .. x(n-r) would leave out on each side
    while r + 1 <= n - r - 1 and 1 - 2 * below / 2**n >= level:
        r += 1
        below += math.comb(n, r)
    return ordered[r - 1], ordered[n - r]


def paired_ratio(a: Stats, b: Stats) -> Stats:
    """Statistics of ``a / b`` round by round, for two variants timed by the same :func:`interleaved`."""
    if a.n != b.n or not a.samples:
        raise ValueError("paired_ratio needs the samples of two variants of one interleaved run")
    return stats([x / y for x, y in zip(a.samples, b.samples)])


def interleaved(
    fns: dict[str, Callable[[], object]],
    budget_s: float,
    min_reps: int = 5,
    max_reps: int = 200,
    after: Callable[[str], object] | None = None,
) -> dict[str, Stats]:
    """Time every function in ``fns``, interleaved, for about ``budget_s`` seconds in total.

    One untimed warm-up call each sets the number of rounds. ``after(name)`` runs untimed after
    each timed call (to reset state, e.g. crop a KV cache).
    """
    names = list(fns)
    first = 0.0
    for name in names:
        start = time.perf_counter()
        fns[name]()
        first += time.perf_counter() - start
        if after is not None:
            after(name)
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-9))))
    return {n: stats(s) for n, s in timed_rounds(fns, reps, after).items()}


class WallClock:
    """Seconds between :meth:`start` and :meth:`stop`, by ``time.perf_counter``."""

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self.t0


def rotated(names: list[str], rep: int) -> list[str]:
    """``names`` rotated left by ``rep`` places (modulo their number): round ``rep``'s order, so that every
    name comes first, second, ... equally often over the rounds."""
    k = rep % len(names)
    return names[k:] + names[:k]


def timed_rounds(
    fns: dict[str, Callable[[], object]],
    reps: int,
    after: Callable[[str], object] | None = None,
    clock: WallClock | None = None,
) -> dict[str, list[float]]:
    """``{name: times}``: ``reps`` rounds in which every function in ``fns`` is called and timed once,
    the order rotated every round; ``after(name)`` runs untimed after each call. ``clock``: anything
    with ``start()`` and ``stop() -> seconds`` (default the wall clock; the gpu suite's CUDA events)."""
    clock = clock or WallClock()
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in rotated(names, rep):
            clock.start()
            fns[name]()
            samples[name].append(clock.stop())
            if after is not None:
                after(name)
    return samples


def timed_runs(
    fns: dict[str, Callable[[], object]],
    steps: int,
    reps: int,
    after: Callable[[str], object] | None = None,
) -> dict[str, list[float]]:
    """``{name: times}``: ``reps`` rounds in which every function in ``fns`` is called ``steps`` times in a
    row (``steps`` >= 2), the order rotated every round; each round gives one time per function: the median
    of its calls after the first (the first follows another function's calls). ``after(name)`` runs untimed
    after each call. What a loop that calls one function over and over (generation's decode steps) gets,
    where :func:`timed_rounds` times each call right after a different function's.

    Raises ``ValueError`` for ``steps`` < 2."""
    if steps < 2:
        raise ValueError(f"timed_runs needs at least 2 steps a run, got {steps}")
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in rotated(names, rep):
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                fns[name]()
                times.append(time.perf_counter() - start)
                if after is not None:
                    after(name)
            samples[name].append(statistics.median(times[1:]))
    return samples


def load() -> tuple[float, float, float]:
    """The machine's 1/5/15-minute load averages (others' processes share the cores)."""
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return (float("nan"),) * 3


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (unchanged for ``None`` / 0) and restored
    after it: a suite run in a process that goes on (a test, a notebook) leaves its thread count as it
    found it (BLAS results can differ in the last bits between thread counts)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
