"""The composed cost model: options on the same layers multiply, they do not add.

Each option is measured alone on the base graph. What it does there is read per *base node*: a node
the option kept (same name and operator) but changed (new input shapes: pruned channels) has its time
multiplied by ``t_option / t_base``; the nodes of a module the option replaced (a linear by its int8 op
or by two factors) share one ratio, the new nodes' time in that module over the removed ones'; new
nodes in a module that lost none are an added time. An allocation ``A`` (one option per site, or none)
is then predicted as

    T(A) = Σ_n t_n · Π_s r_{s,A_s}(n) + Σ_s extra_{s,A_s}

so a conv whose input and output groups are both pruned keeps ``p_in · p_out`` of its time, and int8
on a pruned layer saves its speed-up of what pruning left, not of the whole layer (the additive model
``T(∅) − Σ_s saving_s`` counted the conv's time twice and int8's saving at full size). Size and MACs
budgets are counted per graph, not per node; their options compose additively (no ratios).

``T`` is multilinear in the sites' choices, so with every other site fixed it is exactly affine in one
site's: the saving of each option *in the context* of the others (:meth:`ComposedFront.linearized`) is
exact for a change of one site and a first-order model of a change of several. The allocator
(:meth:`ComposedFront.allocation`) solves the multiple-choice knapsack (:class:`~.allocate.Front`) on
those savings, re-linearizes at its answer, and repeats until the answer repeats; each answer is checked
with the exact ``T``, and the least-error one that saves enough is returned. The first round, linearized
at "nothing changed", is the additive model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .allocate import Allocation, Choice, Front
from .cost_model import CostModel, GraphProfile
from .sensitivity import Analysis

ROUNDS = 8  # re-linearizations per allocation (exact one-site moves finish what they leave short)


@dataclass(frozen=True)
class Effect:
    """One option's effect on the base graph: a ratio per changed base node (its index) and added time."""

    ratios: dict[int, float] = field(default_factory=dict)
    extra: float = 0.0


def effect_of(base: GraphProfile, option: GraphProfile, time_of: Callable[[str], float]) -> Effect:
    """Match ``option``'s nodes to ``base``'s by name and operator (see the module doc) and read the ratios."""
    index = {name: i for i, (name, _, _) in enumerate(base.nodes)}
    base_ms = [time_of(key) for key in base.keys]
    kept, ratios, added = set(), {}, defaultdict(float)
    for key, (name, target, module) in zip(option.keys, option.nodes):
        i = index.get(name)
        if i is not None and base.nodes[i][1] == target:
            kept.add(i)
            if key != base.keys[i]:
                ratios[i] = time_of(key) / max(base_ms[i], 1e-12)
        else:
            added[module] += time_of(key)
    removed = defaultdict(list)
    for i, (_, _, module) in enumerate(base.nodes):
        if i not in kept:
            removed[module].append(i)
    for module, nodes in removed.items():
        ratio = added.pop(module, 0.0) / max(sum(base_ms[i] for i in nodes), 1e-12)
        ratios.update({i: ratio for i in nodes})
    return Effect(ratios, sum(added.values()))


class ComposedFront:
    """The allocator over :math:`T(A)`: least total error for a required saving ``T(∅) − T(A)``.

    ``node_times``: the base graph's node times (empty for a counted resource); ``total``: ``T(∅)``;
    ``effects[s][j]`` and ``errors[s][j]``: option ``j`` of site ``s`` (``None``: not usable)."""

    def __init__(self, node_times: Sequence[float], total: float, effects: Sequence[Sequence[Effect | None]],
                 errors: Sequence[Sequence[float]]):
        self.base = np.asarray(node_times, dtype=float)
        self.total = float(total)
        self.errors = [[e if math.isfinite(e) else math.inf for e in site] for site in errors]
        self.usable = [[fx is not None and math.isfinite(e) for fx, e in zip(site, errs)] for site, errs in zip(effects, self.errors)]
        self.factors, self.extras = [], []
        for site in effects:
            rows = np.ones((len(site) + 1, len(self.base)))  # row 0: unchanged
            for j, effect in enumerate(site):
                for i, ratio in (effect.ratios.items() if effect is not None else ()):
                    rows[j + 1, i] = ratio
            self.factors.append(rows)
            self.extras.append(np.array([0.0] + [fx.extra if fx is not None else 0.0 for fx in site]))
        self.strongest = self._strongest()
        self.max_saving = self.saving(self.strongest)
        self.step = self.max_saving / 2000 if self.max_saving > 0 else 1.0

    def quantity(self, picks: Sequence[int]) -> float:
        """The exact composed prediction :math:`T(A)` of an allocation (``-1``: site unchanged)."""
        product = np.ones(len(self.base))
        for rows, j in zip(self.factors, picks):
            product *= rows[j + 1]
        changed = float(np.dot(self.base, product - 1.0))
        return self.total + changed + sum(extras[j + 1] for extras, j in zip(self.extras, picks))

    def saving(self, picks: Sequence[int]) -> float:
        return self.total - self.quantity(picks)

    def error(self, picks: Sequence[int]) -> float:
        return sum(errors[j] for errors, j in zip(self.errors, picks) if j >= 0)

    def linearized(self, picks: Sequence[int]) -> list[list[Choice]]:
        """Each option's saving over its site unchanged, every other site at ``picks`` (exact for one site)."""
        current = [rows[j + 1] for rows, j in zip(self.factors, picks)]
        before, after, running = [], [None] * len(current), np.ones(len(self.base))
        for row in current:  # before[s] = Π_{s' < s}, after[s] = Π_{s' > s} of the sites' current factors
            before.append(running)
            running = running * row
        running = np.ones(len(self.base))
        for s in reversed(range(len(current))):
            after[s] = running
            running = running * current[s]
        sites = []
        for s, (rows, extras) in enumerate(zip(self.factors, self.extras)):
            rest = self.base * before[s] * after[s]
            savings = rest @ (1.0 - rows[1:]).T - extras[1:]
            sites.append([Choice(float(v), self.errors[s][j]) if self.usable[s][j] else Choice(0.0, math.inf)
                          for j, v in enumerate(savings)])
        return sites

    def _strongest(self) -> tuple[int, ...]:
        """The largest saving, by coordinate ascent: each site's best option given the others, until stable."""
        picks = [-1] * len(self.factors)
        for _ in range(ROUNDS):
            changed = False
            for s in range(len(picks)):
                savings = {-1: 0.0} | {j: c.saving for j, c in enumerate(self.linearized(picks)[s]) if self.usable[s][j]}
                best = max(savings, key=savings.get)
                if savings[best] > savings[picks[s]] + 1e-12 * max(1.0, abs(self.total)):
                    picks[s], changed = best, True
            if not changed:
                break
        return tuple(picks)

    def _allocation(self, picks: Sequence[int]) -> Allocation:
        return Allocation(tuple(picks), self.saving(picks), self.error(picks))

    def _iterates(self, propose: Callable[[Front, float], Allocation | None]) -> list[Allocation]:
        """Re-linearize at each proposal until one repeats; ``propose(front, constant)`` answers on a
        linearization, where ``T(A) ≈ constant − Σ_s saving_s(A_s)``."""
        picks, seen, found = (-1,) * len(self.factors), set(), []
        for _ in range(ROUNDS):
            sites = self.linearized(picks)
            constant = self.quantity(picks) + sum(c[j].saving for c, j in zip(sites, picks) if j >= 0)
            proposal = propose(Front(sites), constant)
            if proposal is None or proposal.picks in seen:
                break
            seen.add(proposal.picks)
            found.append(self._allocation(proposal.picks))
            picks = proposal.picks
        return found

    def allocation(self, required_saving: float) -> Allocation | None:
        """The least-error allocation found that saves at least ``required_saving`` on the exact ``T``
        (``None`` if even the strongest allocation cannot): the knapsack's answers on successive
        linearizations, the one with the largest saving completed by exact one-site moves if it falls
        short, and the best that meets relaxed by exact one-site moves while it still meets."""
        tolerance = 1e-9 * max(1.0, abs(required_saving))
        if required_saving > self.max_saving + tolerance:
            return None
        target = self.total - required_saving
        found = self._iterates(lambda front, constant: front.allocation(constant - target)
                               or front.allocation(front.max_saving * 0.999))
        meeting = [a for a in found if a.saving >= required_saving - tolerance]
        if not meeting:
            closest = max(found, key=lambda a: a.saving).picks if found else self.strongest
            meeting = [self._allocation(self._tighten(closest, required_saving - tolerance))]
        best = min(meeting, key=lambda a: (a.error, -a.saving))
        return self._allocation(self._relax(best.picks, required_saving - tolerance))

    def _moves(self, picks: Sequence[int]):
        """Every one-site change of ``picks``: (site, option, exact added saving, added error)."""
        for s, options in enumerate(self.linearized(picks)):
            current = options[picks[s]] if picks[s] >= 0 else Choice(0.0, 0.0)
            for j, choice in [(-1, Choice(0.0, 0.0)), *enumerate(options)]:
                if j != picks[s] and (j < 0 or self.usable[s][j]):
                    yield s, j, choice.saving - current.saving, choice.error - current.error

    def _tighten(self, picks: Sequence[int], required: float) -> tuple[int, ...]:
        """Exact one-site moves until ``required`` is saved: most saving (up to the shortfall) per error."""
        picks = list(picks)
        for _ in range(4 * len(picks) + 4):
            short = required - self.saving(picks)
            if short <= 0:
                break
            scored = [(min(gain, short) / max(cost, 1e-12), s, j) for s, j, gain, cost in self._moves(picks) if gain > 0]
            if not scored:
                return self.strongest
            _, s, j = max(scored)
            picks[s] = j
        return tuple(picks) if self.saving(picks) >= required else self.strongest

    def _relax(self, picks: Sequence[int], required: float) -> tuple[int, ...]:
        """Exact one-site moves that lower the error and still save ``required``, the largest drop first."""
        picks = list(picks)
        for _ in range(4 * len(picks) + 4):
            slack = self.saving(picks) - required
            moves = [(cost, s, j) for s, j, gain, cost in self._moves(picks) if cost < 0 and gain >= -slack]
            if not moves:
                break
            _, s, j = min(moves)
            picks[s] = j
        return tuple(picks)

    def cheapest_within(self, max_error: float) -> Allocation:
        """The allocation found with the largest saving whose error stays within ``max_error``."""
        found = [a for a in self._iterates(lambda front, _: front.cheapest_within(max_error)) if a.error <= max_error]
        return max(found, key=lambda a: a.saving) if found else self._allocation((-1,) * len(self.factors))

    def points(self, samples: int = 40) -> list[tuple[float, float]]:
        """(saving, least error found) from no saving to the largest, dominated points dropped."""
        found = [a for r in np.linspace(0.0, self.max_saving, samples) if (a := self.allocation(float(r))) is not None]
        result = []
        for a in sorted(found, key=lambda a: (-a.saving, a.error)):
            if not result or a.error < result[-1][1]:
                result.append((a.saving, a.error))
        return result[::-1]


def composed_front(analysis: Analysis, quantity: Callable[[GraphProfile], float], costs: CostModel | None) -> ComposedFront:
    """The allocator over an analysis: per base node with ``costs`` (latency: node times times the cost
    model's correction, so ``T(∅)`` is the base graph's prediction), else additive per option in the
    units of ``quantity`` (size, MACs)."""
    base = analysis.base
    time_of = (lambda key: costs.correction * costs.timings[key]) if costs is not None else None
    node_times = [time_of(key) for key in base.keys] if time_of else []
    total = sum(node_times) if time_of else quantity(base)
    effects, errors = [], []
    for site in analysis.space.sites:
        measured = [analysis.options.get(setting) for setting in site.options]
        usable = [m if m is not None and m.error == m.error else None for m in measured]
        effects.append([None if m is None else effect_of(base, m.profile, time_of) if time_of
                        else Effect(extra=quantity(m.profile) - total) for m in usable])
        errors.append([math.inf if m is None else m.error for m in usable])
    return ComposedFront(node_times, total, effects, errors)
