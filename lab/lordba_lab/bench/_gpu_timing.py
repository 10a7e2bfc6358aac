"""GPU timing for side-by-side comparisons: CUDA events around a batch of calls, variants interleaved.

Each sample is the GPU time of ``calls`` back-to-back calls divided by ``calls``, taken between two
CUDA events on the current stream; the variants take turns within a round, the order rotated every
round (as :func:`lordba_lab.bench._timing.interleaved` does on CPU), so the paired ratios of
:func:`~lordba_lab.bench._timing.paired_ratio` apply. Two ways of issuing the calls:

* ``eager``: the Python calls themselves (what ``model(...)`` in a script gets: where the kernels are
  short, the CPU's launch rate sets the time);
* ``graph``: the same calls captured once in a CUDA graph and replayed (what a server that captures
  its decode step gets: the GPU's own time, launch costs gone).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from lordba_lab.bench._timing import Stats, WallClock, stats, timed_rounds


def captured(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    """A function replaying ``calls`` calls of ``fn`` captured in one CUDA graph (warmed up on a side
    stream first, as CUDA graphs require: compiling and allocating happen before the capture).

    Raises whatever the capture raises (an op that synchronizes or allocates outside the graph's pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def interleaved_gpu(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    calls: int,
    per_round: dict[str, int] | None = None,
    after: Callable[[str], object] | None = None,
) -> dict[str, Stats]:
    """Seconds per call of every function in ``fns``, ``rounds`` samples each, interleaved
    (:func:`~lordba_lab.bench._timing.timed_rounds`, timed by CUDA events where CUDA is present).

    ``per_round[name]``: how many calls one invocation of ``fns[name]`` makes (a captured graph of
    ``calls`` calls: ``calls``; default 1, then ``fns[name]`` is called ``calls`` times per sample).
    ``after(name)`` runs untimed after each sample (to reset state, e.g. crop a KV cache)."""
    per_round = per_round or {}
    for name, fn in fns.items():  # warm-up: compile, allocate, fill caches
        fn()
        if after is not None:
            after(name)
    repeat = {n: max(1, calls // per_round.get(n, 1)) for n in fns}
    batches = {n: functools.partial(_repeated, fn, repeat[n]) for n, fn in fns.items()}
    clock = _CudaClock() if torch.cuda.is_available() else WallClock()
    samples = timed_rounds(batches, rounds, after, clock)
    return {n: stats([t / (repeat[n] * per_round.get(n, 1)) for t in s]) for n, s in samples.items()}


def _repeated(fn: Callable[[], object], n: int) -> None:
    for _ in range(n):
        fn()


class _CudaClock:
    """Seconds between :meth:`start` and :meth:`stop` by CUDA events on the current stream."""

    def __init__(self) -> None:
        torch.cuda.synchronize()
        self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self.begin.record()

    def stop(self) -> float:
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1000.0
