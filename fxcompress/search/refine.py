"""Refinement around a measured pipeline: the least-error allocation one step from the best one that meets.

The composed cost model (:mod:`.compose`) still misses what no single option shows (int8 regions,
dispatch, timing noise), and a measured pipeline's slack is worth spending. The sites' savings are
linearized at the anchor (each option's saving with every other site as the anchor has it: exact for
a one-site move). Refinement takes the best measured candidate that meets the budget (often a
single-pass baseline), lets each site move at most one step along its options ordered by saving (down
only when the anchor has slack, up only when it is over the budget), and asks for the least error
whose saving, relative to the anchor's, gives up at most the anchor's measured slack
(``budget − measured``, in the allocator's units). The multiple-choice knapsack
(:class:`~.allocate.Front`) solves it over the neighbourhoods.
"""

from __future__ import annotations

import math
from typing import Sequence

from .allocate import Choice, Front

UNCHANGED = Choice(0.0, 0.0)  # option -1: the site as it is


def neighbourhood(options: Sequence[Choice], pick: int, relax: bool) -> list[int]:
    """``pick`` and the option one step below it in order of saving (``relax``) or one step above it
    (option indices, ``-1``: unchanged), least saving first. The ladder holds the options that save
    and ``pick`` itself even if it does not (a baseline's rank 1/2 on a conv it makes slower)."""
    usable = [j for j, c in enumerate(options) if (c.saving > 0 or j == pick) and math.isfinite(c.error)]
    ladder = sorted([-1, *usable], key=lambda j: (options[j] if j >= 0 else UNCHANGED).saving)
    k = ladder.index(pick) if pick in ladder else ladder.index(-1)
    return ladder[max(0, k - 1):k + 1] if relax else ladder[k:k + 2]


def saving_of(sites: Sequence[Sequence[Choice]], picks: Sequence[int]) -> float:
    return sum(options[j].saving for options, j in zip(sites, picks) if j >= 0)


def refine(sites: Sequence[Sequence[Choice]], anchor: Sequence[int], slack: float) -> tuple[int, ...] | None:
    """Picks within one step of ``anchor`` per site, least total error, saving at least the anchor's
    minus ``slack`` (``None`` if no such picks exist). A slack >= 0 only relaxes sites (gives up
    saving for error), a negative one only tightens them: the change stays as small as the slack.
    Each site's least-saving neighbour plays the front's "unchanged"."""
    local_sites, ladders, offset = [], [], 0.0
    for options, pick in zip(sites, anchor):
        near = neighbourhood(options, pick, relax=slack >= 0)
        low, *choices = (options[j] if j >= 0 else UNCHANGED for j in near)
        local_sites.append([Choice(c.saving - low.saving, c.error - low.error) for c in choices])
        ladders.append(near)
        offset += low.saving
    allocation = Front(local_sites).allocation(saving_of(sites, anchor) - slack - offset)
    if allocation is None:
        return None
    return tuple(ladder[j + 1] for ladder, j in zip(ladders, allocation.picks))
