"""The pruning budget shared out between kinds of coupled groups from calibration data (``allocation="model"``).

A uniform ratio removes the same fraction of attention heads as of feed-forward channels, although the two
cost the model very different output error per MAC removed. Groups are sorted into *kinds* by their unit
width (a head spans ``head_dim`` channels, a feed-forward or conv channel one). The kind with the most
channels *balances*: for each candidate ratio of the other kinds (:data:`KIND_FACTORS` × the uniform ratio),
its ratio is bisected so that the model keeps no more MACs than under the uniform ratio. Every candidate is
pruned and compensated with the statistics of the first calibration batches and scored by how well it
reproduces the original outputs on the last ones (:func:`~.ridge.held_out_error`) — never on evaluation
data. The uniform ratio is a candidate, so the choice never does worse than it on those batches.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch.fx as fx

from fxcompress.passes.prune import compensate as compensation
from fxcompress.passes.prune.graph import ChannelGraph
from fxcompress.passes.prune.importance import choose_units
from fxcompress.passes.prune.rewrite import apply_pruning
from fxcompress.passes.prune.ridge import MODEL_GRID, held_out_error, split_batches
from fxcompress.statistics import collect_statistics

KIND_FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0)
BISECTION_STEPS = 10


def group_kinds(graph: ChannelGraph) -> list[int]:
    """Each group's kind: its unit width."""
    return [group.width for group in graph.groups]


def chosen_at(graph: ChannelGraph, scores: list[np.ndarray], ratios: list[float], max_ratio: float,
              round_to: int) -> list[np.ndarray]:
    """The units each group loses at its own ratio (local scope: one choice per distinct ratio is exact)."""
    by_ratio = {r: choose_units(graph, scores, r, "local", max_ratio, round_to) for r in set(ratios)}
    return [by_ratio[r][i] for i, r in enumerate(ratios)]


def candidates(graph: ChannelGraph, scores: list[np.ndarray], ratio: float, max_ratio: float, round_to: int,
               macs: Callable[[list[np.ndarray]], int]) -> dict[tuple[float, float], list[np.ndarray]]:
    """``(ratio of the other kinds, ratio of the balancing kind) → units to remove`` for every candidate
    whose MACs (``macs(chosen)``) are at most those of the uniform ``ratio``; the uniform one included."""
    kinds = group_kinds(graph)
    prunable = [k for k, g in zip(kinds, graph.groups) if g.units]
    if len(set(prunable)) < 2:
        return {(ratio, ratio): chosen_at(graph, scores, [ratio] * len(kinds), max_ratio, round_to)}
    channels = {k: sum(len(g.units) * g.width for kk, g in zip(kinds, graph.groups) if kk == k) for k in set(prunable)}
    balancing = max(channels, key=channels.get)
    budget = macs(chosen_at(graph, scores, [ratio] * len(kinds), max_ratio, round_to))
    found = {}
    for factor in KIND_FACTORS:
        other = min(ratio * factor, max_ratio)

        def at(balance: float) -> list[np.ndarray]:
            return chosen_at(graph, scores, [balance if k == balancing else other for k in kinds], max_ratio, round_to)

        if factor == 1.0:
            found[(other, ratio)] = at(ratio)
            continue
        low, high = 0.0, max_ratio
        if macs(at(high)) > budget:
            continue  # the balancing kind cannot make up for keeping this much of the others
        for _ in range(BISECTION_STEPS):
            mid = (low + high) / 2
            low, high = (low, mid) if macs(at(mid)) <= budget else (mid, high)
        found[(other, round(high, 4))] = at(high)
    return found


def best_allocation(options: dict, error: Callable[[list[np.ndarray]], float]) -> tuple[tuple, dict]:
    """The candidate with the least held-out calibration error, and every candidate's error."""
    errors = {key: error(chosen) for key, chosen in options.items()}
    return min(errors, key=errors.get), errors


def pruned_trials(gm: fx.GraphModule, graph: ChannelGraph, fit: list, method: str | None) -> Callable:
    """``(removed, ridge) → `` a pruned copy of ``gm``, compensated by ``method`` (``None``: not at all) with
    that relative ridge on the statistics of the ``fit`` batches, collected once."""
    stats = {}
    if method is not None:
        stats = collect_statistics(gm, fit, list(compensation.consumers(gm).values()), gram=method == "lstsq", progress=False)

    def trial(removed: dict, ridge: float) -> fx.GraphModule:
        copied = copy.deepcopy(gm)
        if removed:
            apply_pruning(copied, graph, removed, refresh_meta=False)
            if method is not None:
                compensation.apply(copied, graph, removed, compensation.plan(gm, graph, removed, stats, method, ridge)[0])
        return copied

    return trial


def allocate(gm: fx.GraphModule, graph: ChannelGraph, options: dict, removal: Callable, batches: list,
             method: str | None, ridge: float | str, uniform_removed: dict) -> tuple[tuple, float | str, dict]:
    """``(chosen allocation key, ridge, summary)``. With ``ridge="model"`` the ridge is chosen first, at the
    uniform allocation, on the same held-out calibration batches (:data:`~.ridge.MODEL_GRID`)."""
    fit, check = split_batches(batches)
    error, trial = held_out_error(gm, check), pruned_trials(gm, graph, fit, method)
    summary: dict = {}
    if ridge == "model":
        ridge_errors = {r: error(trial(uniform_removed, r)) for r in MODEL_GRID}
        ridge = min(ridge_errors, key=ridge_errors.get)
        summary["ridge_errors"] = ridge_errors
    key, errors = best_allocation(options, lambda chosen: error(trial(removal(chosen), ridge)))
    summary.update(ridge=ridge, allocation=key, allocation_errors={f"{a:g}/{b:g}": e for (a, b), e in errors.items()})
    return key, ridge, summary
