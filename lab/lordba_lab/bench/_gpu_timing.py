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

import time
from collections.abc import Callable

import torch

from lordba_lab.bench._timing import Stats, stats


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
    """Seconds per call of every function in ``fns``, ``rounds`` samples each, interleaved.

    ``per_round[name]``: how many calls one invocation of ``fns[name]`` makes (a captured graph of
    ``calls`` calls: ``calls``; default 1, then ``fns[name]`` is called ``calls`` times per sample).
    ``after(name)`` runs untimed after each sample (to reset state, e.g. crop a KV cache)."""
    per_round = per_round or {}
    names = list(fns)
    for name in names:  # warm-up: compile, allocate, fill caches
        fns[name]()
        if after is not None:
            after(name)
    clock = _Clock()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(rounds):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            repeat = max(1, calls // per_round.get(name, 1))
            clock.start()
            for _ in range(repeat):
                fns[name]()
            samples[name].append(clock.stop() / (repeat * per_round.get(name, 1)))
            if after is not None:
                after(name)
    return {n: stats(s) for n, s in samples.items()}


class _Clock:
    """Seconds between :meth:`start` and :meth:`stop`: CUDA events on the current stream where CUDA
    is present, else the wall clock (so the suite's code runs, slowly, on a CPU machine too)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t0
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1000.0
