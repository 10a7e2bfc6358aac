"""Per-layer ranks at a total byte budget (beyond the paper).

Each layer ``l`` has an error-versus-rank curve ``E_l(r) = ε_l(r)² ‖ΔW_l‖²`` (absolute squared error
of its conversion at rank ``r``) and a cost ``bytes_l(r)`` (packed signs plus stored scales). We
minimise ``Σ_l E_l(r_l)`` subject to ``Σ_l bytes_l(r_l) ≤ budget``: a multiple-choice knapsack,
solved by the classic greedy on each curve's lower convex hull (always take the upgrade with the
largest error decrease per byte that still fits). This is optimal for the convex relaxation (the
Lagrangian solution) and within one upgrade of it in bytes.

The budget comes from a target BPW on the LoRA basis: ``target_bpw · Σ_l r_lora,l (in_l + out_l) / 8``
bytes for the whole weights file, less the file's header overhead.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

DEFAULT_CANDIDATES = (1, 2, 4, 8, 12, 16, 24, 32)
# The largest target: the LoRA itself in float32. Above it the budget buys ranks far past any use (the uniform
# rank that fits is held to the layers' rank limits, and converted).
MAX_TARGET_BPW = 32.0


def rank_limit(in_features: int, out_features: int) -> int:
    """The largest rank a layer converts at: above it its sign factors alone hold more bits than its ΔW in
    float32 (``r (in + out) > 32 in out``); :func:`lordba.convert.pipeline.convert_lora` refuses a given
    ``r`` above it, and the search at a target BPW never converts or chooses one."""
    return 32 * in_features * out_features // (in_features + out_features)


def _hull(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """Lower convex hull of (bytes, error, rank) points, bytes increasing and error decreasing."""
    pts = sorted(points)
    frontier: list[tuple[int, float, int]] = []
    for p in pts:
        if frontier and p[1] >= frontier[-1][1]:
            continue  # costs more, no better
        frontier.append(p)
    hull: list[tuple[int, float, int]] = []
    for p in frontier:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] → p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


@dataclass
class Allocation:
    """Chosen rank per layer and its totals."""

    ranks: dict[str, int]
    payload_bytes: int
    squared_error: float


def allocate(curves: dict[str, dict[int, tuple[int, float]]], budget: int) -> Allocation:
    """Ranks minimising the total squared error within ``budget`` payload bytes.

    ``curves[path][r] = (bytes, squared error)``. Raises ``ValueError`` if even the cheapest ranks
    do not fit.
    """
    hulls = {p: _hull([(b, e, r) for r, (b, e) in c.items()]) for p, c in curves.items()}
    pos = dict.fromkeys(hulls, 0)
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise ValueError(f"the budget of {budget} bytes is below the smallest ranks' {used} bytes")
    heap: list[tuple[float, str]] = []

    def push(path: str) -> None:
        h, i = hulls[path], pos[path]
        if i + 1 < len(h):
            gain = (h[i][1] - h[i + 1][1]) / max(h[i + 1][0] - h[i][0], 1)
            heapq.heappush(heap, (-gain, path))

    for path in sorted(hulls):
        push(path)
    while heap:
        _, path = heapq.heappop(heap)
        h, i = hulls[path], pos[path]
        extra = h[i + 1][0] - h[i][0]
        if used + extra > budget:
            continue  # this layer cannot afford its next step; later (flatter) steps of others may
        used += extra
        pos[path] = i + 1
        push(path)
    ranks = {p: hulls[p][pos[p]][2] for p in sorted(hulls)}
    return Allocation(ranks, used, sum(hulls[p][pos[p]][1] for p in hulls))
