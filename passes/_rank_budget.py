"""The ``target_macs`` budget of ``low_rank``: one rank option per layer so the model's MACs fall to a fraction.

Greedy on the lower convex hull of each layer's (MACs, discarded energy) curve — the marginal-cost
allocation of a separable convex budget problem.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RankOption:
    """One way to factorize a layer: ranks per spectrum, its MACs and its discarded energy."""

    ranks: tuple[int, ...]
    macs: int
    loss: float


def _lower_hull(points: list[RankOption]) -> list[RankOption]:
    """Lower convex hull of (MACs, loss) points given by decreasing MACs: the efficient steps."""

    def slope(a: RankOption, b: RankOption) -> float:
        return (b.loss - a.loss) / (a.macs - b.macs)

    hull: list[RankOption] = []
    for point in points:
        if hull and point.macs >= hull[-1].macs:
            continue
        while len(hull) >= 2 and slope(hull[-2], hull[-1]) >= slope(hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def allocate_budget(
    original_macs: Sequence[int], options: Sequence[list[RankOption]], keep_fraction: float
) -> list[RankOption | None]:
    """Pick one option per layer (None: leave it) so the total MACs fall to ``keep_fraction`` of the original.

    Greedy on the lower convex hull of each layer's (MACs, discarded energy) curve: repeatedly take
    the step, over all layers, that discards the least energy per MAC saved, until the budget holds
    or no step is left. Options that do not save MACs are never taken.
    """
    budget = keep_fraction * sum(original_macs)
    hulls = []
    for macs, layer_options in zip(original_macs, options):
        start = RankOption((), macs, 0.0)
        cheaper = sorted((o for o in layer_options if o.macs < macs), key=lambda o: -o.macs)
        hulls.append(_lower_hull([start, *cheaper]))
    position = [0] * len(hulls)
    total = float(sum(original_macs))
    heap = []
    for i, hull in enumerate(hulls):
        if len(hull) > 1:
            heapq.heappush(heap, (_step_cost(hull, 0), i))
    while total > budget and heap:
        _, i = heapq.heappop(heap)
        hull, at = hulls[i], position[i]
        total -= hull[at].macs - hull[at + 1].macs
        position[i] = at + 1
        if at + 2 < len(hull):
            heapq.heappush(heap, (_step_cost(hull, at + 1), i))
    return [hull[at] if at > 0 else None for hull, at in zip(hulls, position)]


def _step_cost(hull: list[RankOption], at: int) -> float:
    return (hull[at + 1].loss - hull[at].loss) / (hull[at].macs - hull[at + 1].macs)


def scaled_losses(options: Sequence[list[RankOption]], scales: Sequence[float | None]) -> list[list[RankOption]]:
    """Each layer's option losses times its scale; a layer whose scale is ``None`` gets the median of the others."""
    known = sorted(s for s in scales if s is not None)
    fallback = known[len(known) // 2] if known else 1.0
    return [[RankOption(o.ranks, o.macs, o.loss * (fallback if s is None else s)) for o in layer_options]
            for layer_options, s in zip(options, scales)]
