"""The allocator: one option per site, least total error for a required saving (multiple-choice knapsack).

Each site (a coupled channel group, a layer) has options with a *saving* (latency, bytes or MACs the
option removes from the model, measured per option) and an *error* (measured per option on the
calibration data). Savings and errors are taken as additive over sites: the search solves this on
savings linearized at an allocation (:mod:`.compose`: options on the same layers multiply, so one
site's saving depends on the others'); the pipelines proposed are then built and measured end to end.

Dynamic programme over the saving discretized into ``bins`` steps (each option's saving rounded to
the nearest step; a proposal is checked against the exact sum):
``E_i(t) = min_j E_{i-1}(max(0, t − s_ij)) + e_ij`` with ``E_0(0) = 0``, ``E_0(t>0) = ∞``, where
``E_i(t)`` is the least error of the first ``i`` sites saving at least ``t`` bins. One run gives the
whole front ``t ↦ E_n(t)``; a greedy walk along each site's convex hull would only give its vertices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Choice:
    """One option of a site: its saving (> 0 to be useful) and its error (>= 0)."""

    saving: float
    error: float


@dataclass(frozen=True)
class Allocation:
    """The option index per site (``-1``: the site stays as it is), the total saving and error."""

    picks: tuple[int, ...]
    saving: float
    error: float


class Front:
    """The least-error allocation for every required saving (one DP over all sites)."""

    def __init__(self, sites: Sequence[Sequence[Choice]], bins: int = 2000):
        self.sites = [list(options) for options in sites]
        useful = [c.saving for options in self.sites for c in options if c.saving > 0]
        self.max_saving = sum(max((c.saving for c in opts if c.saving > 0), default=0.0) for opts in self.sites)
        self.step = self.max_saving / bins if useful else 1.0
        self.bins = bins if useful else 0
        self._solve()

    def _shift(self, choice: Choice) -> int:
        return int(round(choice.saving / self.step))

    def _solve(self) -> None:
        size = self.bins + 1
        best = np.full(size, math.inf)
        best[0] = 0.0
        self._picks = []
        for options in self.sites:
            new = best.copy()  # option -1: nothing saved, no error
            pick = np.full(size, -1, dtype=np.int64)
            for j, choice in enumerate(options):
                if choice.saving <= 0:
                    continue
                candidate = best[np.maximum(np.arange(size) - self._shift(choice), 0)] + max(choice.error, 0.0)
                better = candidate < new
                new[better], pick[better] = candidate[better], j
            self._picks.append(pick)
            best = new  # non-decreasing in t, as "saves at least t" must be
        self.errors = best

    def allocation(self, required_saving: float) -> Allocation | None:
        """The least-error allocation saving at least ``required_saving`` (``None`` if none can)."""
        if required_saving <= 0:
            return self._reconstruct(0)
        # bins round each saving to nearest: start a few bins low, take the first whose exact saving suffices
        start = max(0, int(math.floor(required_saving / self.step)) - len(self.sites))
        for t in range(start, self.bins + 1):
            if not math.isfinite(self.errors[t]):
                continue
            allocation = self._reconstruct(t)
            if allocation.saving >= required_saving - 1e-9 * max(1.0, required_saving):
                return allocation
        return None

    def _reconstruct(self, t: int) -> Allocation:
        picks = []
        for pick, options in zip(reversed(self._picks), reversed(self.sites)):
            j = int(pick[t])
            picks.append(j)
            if j >= 0:
                t = max(t - self._shift(options[j]), 0)
        picks.reverse()
        chosen = [options[j] for options, j in zip(self.sites, picks) if j >= 0]
        return Allocation(tuple(picks), sum(c.saving for c in chosen), sum(max(c.error, 0.0) for c in chosen))

    def points(self) -> list[tuple[float, float]]:
        """(saving, least error) at every distinct step of the front, from no saving to the largest."""
        result, last = [], None
        for t in range(self.bins + 1):
            error = float(self.errors[t])
            if math.isfinite(error) and error != last:
                result.append((t * self.step, error))
                last = error
        return result

    def cheapest_within(self, max_error: float) -> Allocation:
        """The allocation with the largest saving whose error stays within ``max_error``."""
        feasible = [t for t in range(self.bins + 1) if self.errors[t] <= max_error]
        return self._reconstruct(max(feasible)) if feasible else self.allocation(0.0)
