"""The composed cost model (search/compose.py): options on the same layers multiply, and the allocator uses it.

Timings are deterministic: a synthetic cost structure, or the FLOP clock of test_search."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn as nn

from fxcompress.search import Target
from fxcompress.search.allocate import Front
from fxcompress.search.cache import ANALYSES
from fxcompress.search.compose import ComposedFront, Effect
from fxcompress.search.driver import Search
from fxcompress.search.space import apply
from test_search import flop_clock


def brute_force(front: ComposedFront, required: float) -> tuple[float, tuple[int, ...]] | None:
    """The least error over every allocation whose exact composed saving reaches ``required``."""
    best = None
    for picks in itertools.product(*[range(-1, len(errors)) for errors in front.errors]):
        if front.saving(picks) >= required - 1e-9 and (best is None or front.error(picks) < best[0] - 1e-12):
            best = (front.error(picks), picks)
    return best


def test_the_allocator_picks_the_combination_on_the_same_layers_the_additive_model_gets_wrong():
    # two layers of 10 ms; one prune site keeps 60 % of both; int8 halves each layer it is on
    node_times = [10.0, 10.0]
    prune = [Effect({0: 0.6, 1: 0.6})]
    int8_a, int8_b = [Effect({0: 0.5})], [Effect({1: 0.5})]
    front = ComposedFront(node_times, 20.0, [prune, int8_a, int8_b], [[0.02], [0.01], [0.01]])
    required = 20.0 - 0.4 * 20.0  # latency budget 0.4 of the model: at most 8 ms

    chosen = front.allocation(required)
    assert chosen.picks == (0, 0, 0)  # prune everywhere and int8 on both pruned layers: 20 · 0.6 · 0.5 = 6 ms
    assert front.quantity(chosen.picks) == pytest.approx(6.0)
    assert brute_force(front, required) == (pytest.approx(chosen.error), chosen.picks)

    additive = Front(front.linearized((-1, -1, -1)))  # the savings of each option alone, summed
    wrong = additive.allocation(required)
    assert wrong.picks != chosen.picks and wrong.error < chosen.error  # it believes a cheaper pair is enough
    assert front.quantity(wrong.picks) > 8.0  # prune + int8 on one layer: 3 + 6 = 9 ms, over the budget


def test_the_composed_allocator_meets_every_required_saving_and_is_near_the_exact_optimum():
    rng = random.Random(0)
    optimal = 0
    for _ in range(60):
        nodes = rng.randint(2, 4)
        node_times = [rng.uniform(1, 10) for _ in range(nodes)]
        sites = [[Effect({i: rng.uniform(0.2, 0.9) for i in rng.sample(range(nodes), rng.randint(1, nodes))})
                  for _ in range(rng.randint(1, 2))] for _ in range(4)]
        errors = [[rng.uniform(0, 1) for _ in site] for site in sites]
        front = ComposedFront(node_times, sum(node_times), sites, errors)
        required = rng.uniform(0.1, 1.0) * front.max_saving
        chosen, exact = front.allocation(required), brute_force(front, required)
        assert exact is not None and chosen.saving >= required - 1e-9
        assert chosen.saving == pytest.approx(front.saving(chosen.picks))
        optimal += chosen.error <= exact[0] + 1e-9
    assert optimal >= 57  # a heuristic over a non-separable problem: exact in at least 95 % of these


class Chain(nn.Module):
    """Three linears: the middle one's input and output channels are two prune groups."""

    def __init__(self, width: int = 96):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_the_cost_model_composes_options_per_node_on_a_real_graph():
    model, x = Chain().eval(), (torch.randn(32, 96, generator=torch.Generator().manual_seed(0)),)
    ANALYSES.clear()
    search = Search(model, x, Target(latency=0.5, passes=("prune_channels", "low_rank"), prune_ratios=(0.5,),
                                     ranks=(0.25,), baselines=False), clock=flop_clock)
    ANALYSES.clear()
    front = search._front()
    sites = search.analysis.space.sites
    # both groups of b pruned (b keeps a quarter of its MACs) and b factorized on top: all on one layer
    picks = tuple(0 if site.kind == "prune" or site.name == "b" else -1 for site in sites)
    assert sum(p == 0 for p in picks) == 3
    gm = apply(search.input_gm, search.analysis.space.pipeline(search._settings(picks)), search.ctx)
    profile, _ = search.costs.profile(gm, search.ctx.args, search.ctx.kwargs)
    search.costs.measure()
    measured = search.costs.predict_ms(profile)
    additive = front.total - sum(c[j].saving for c, j in zip(front.linearized((-1,) * len(picks)), picks) if j >= 0)
    assert front.quantity(picks) == pytest.approx(measured, rel=0.03)
    assert abs(additive - measured) > 0.1 * measured  # the sum of savings alone counts b's time twice

