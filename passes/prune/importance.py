"""Importance of prunable units and the choice of which to remove.

A unit's score sums a per-index statistic over every parameter index it would remove:
``l1 = sum |w|``, ``l2 = sum w^2``, ``taylor = sum |w * dL/dw|`` (L = the given loss, or the sum
of squares of all outputs, on the example inputs), ``bn_scale = sum |gamma|`` over BatchNorm
weights (``l1`` for groups without BatchNorm), ``random`` a seeded uniform draw,
``activation = sum ‖W[:, c]‖ · ‖x_c‖`` over the input channels ``c`` the unit removes from consumer
layers, on calibration inputs (see :mod:`.compensate`; ``l1`` for groups no consumer reads);
``reconstruction`` picks units by the error left after the consumers' refit (:mod:`.sequential`) and
uses ``activation`` here only to decide how many units each group loses.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxcompress import ir
from fxcompress.pass_base import PassContext
from fxcompress.passes.prune.compensate import channel_importance, consumers
from fxcompress.passes.prune.graph import ChannelGraph, Group

IMPORTANCE = ("l1", "l2", "bn_scale", "taylor", "random", "activation", "reconstruction")
BATCH_NORMS = (torch.ops.aten.batch_norm, torch.ops.aten._native_batch_norm_legit_no_training)


def group_scores(
    gm: fx.GraphModule, graph: ChannelGraph, method: str, ctx: PassContext, loss: Callable | None, seed: int,
    statistics: dict | None = None, centered: bool = False,
) -> list[np.ndarray]:
    """One score per prunable unit of every group (higher = more important).

    ``statistics``: consumer input statistics by node name (for ``activation``); ``centered``: score
    the fluctuation around the mean (the removed mean is compensated)."""
    grads = _gradients(gm, ctx, loss) if method == "taylor" else {}
    consumer_nodes = consumers(gm) if method == "activation" else {}
    bn_weights = _bn_weight_targets(gm) if method == "bn_scale" else set()
    generator = np.random.default_rng(seed)
    cache: dict[tuple[str, int, str], np.ndarray] = {}

    def per_index(target: str, dim: int, stat: str) -> np.ndarray:
        key = (target, dim, stat)
        if key not in cache:
            w = ir.get_attr(gm, target).detach().float()
            if stat == "activation":
                node = consumer_nodes.get(target)
                known = dim == 1 and node is not None and node.name in statistics
                cache[key] = channel_importance(w, statistics[node.name], centered) if known else np.zeros(w.shape[dim])
                return cache[key]
            value = {"l1": w.abs(), "l2": w.square(), "taylor": (w * grads.get(target, torch.zeros_like(w))).abs()}
            other = [d for d in range(w.ndim) if d != dim]
            cache[key] = value[stat].sum(dim=other).numpy() if other else value[stat].numpy()
        return cache[key]

    scores = []
    for group in graph.groups:
        if method == "random":
            scores.append(generator.random(len(group.units)))
            continue
        stat, targets = method, None
        if method == "bn_scale":  # sum |gamma| = l1 restricted to BatchNorm weights
            targets = {t for s, (t, _) in graph.param_spaces.items() if s in group.spaces and t in bn_weights}
            stat = "l1"
        if method == "activation" and not _read_by_consumer(group, graph, consumer_nodes, statistics):
            stat = "l1"
        scores.append(_unit_scores(group, graph, per_index, stat, targets))
    return scores


def _read_by_consumer(group: Group, graph: ChannelGraph, consumer_nodes: dict, statistics: dict) -> bool:
    for sid in group.spaces:
        target, dim = graph.param_spaces.get(sid, (None, None))
        if dim == 1 and target in consumer_nodes and consumer_nodes[target].name in statistics:
            return True
    return False


def _unit_scores(group: Group, graph: ChannelGraph, per_index, stat: str, only_targets: set | None) -> np.ndarray:
    """Every unit's summed statistic: the (unit, index) pairs of each parameter space gathered once, then
    one ``bincount`` per space instead of a sum per unit and space."""
    pairs: dict[int, tuple[list, list]] = {}
    param_spaces = graph.param_spaces
    for u, unit in enumerate(group.units):
        for sid, idx in unit.elements.items():
            if sid in param_spaces:
                owners, indices = pairs.setdefault(sid, ([], []))
                owners.append(u)
                indices.append(idx)
    total = np.zeros(len(group.units))
    for sid, (owners, indices) in pairs.items():
        target, dim = param_spaces[sid]
        if not only_targets or target in only_targets:
            values = per_index(target, dim, stat)[np.concatenate(indices)]
            owner_of_index = np.repeat(owners, [len(idx) for idx in indices])
            total += np.bincount(owner_of_index, weights=values, minlength=len(group.units))
    return total


def _bn_weight_targets(gm: fx.GraphModule) -> set[str]:
    targets = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "overloadpacket", None) in BATCH_NORMS:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                targets.add(weight.target)
    return targets


def _gradients(gm: fx.GraphModule, ctx: PassContext, loss: Callable | None) -> dict[str, torch.Tensor]:
    params = dict(gm.named_parameters())
    was = {name: p.requires_grad for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            outputs = ctx.run(gm)
            value = loss(outputs) if loss is not None else _sum_of_squares(outputs)
            value.backward()
        return {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
    finally:
        for name, p in params.items():
            p.grad = None
            p.requires_grad_(was[name])


def _sum_of_squares(outputs: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().square().sum() for t in leaves)


# --- selection -----------------------------------------------------------------------------


def choose_units(
    graph: ChannelGraph, scores: list[np.ndarray], ratio: float, scope: str, max_ratio: float, round_to: int
) -> list[np.ndarray]:
    """Indices (into ``group.units``) of the units to remove from each group."""
    if scope == "local":
        counts = [min(math.floor(min(ratio, max_ratio) * _total(g)), len(g.units)) for g in graph.groups]
    else:
        counts = _global_counts(graph, scores, ratio, max_ratio)
    chosen = []
    for group, score, count in zip(graph.groups, scores, counts):
        count = _round_count(group, count, round_to)
        order = np.argsort(score, kind="stable")
        chosen.append(_keep_every_space(group, order[:count], graph))
    return chosen


def _total(group: Group) -> int:
    return len(group.units) + group.frozen_units


def _global_counts(graph: ChannelGraph, scores: list[np.ndarray], ratio: float, max_ratio: float) -> list[int]:
    """Rank units of all groups by score relative to their group's mean; each group loses at
    most ``max_ratio`` of its units; stop at ``ratio`` of all channels."""
    ranked = []
    for gid, (group, score) in enumerate(zip(graph.groups, scores)):
        mean = float(score.mean()) if len(score) and score.mean() > 0 else 1.0
        ranked += [(s / mean, gid) for s in score]
    ranked.sort()
    widths = [g.width for g in graph.groups]
    budget = ratio * sum(_total(g) * w for g, w in zip(graph.groups, widths))
    caps = [min(math.floor(max_ratio * _total(g)), len(g.units)) for g in graph.groups]
    counts, removed = [0] * len(graph.groups), 0.0
    for _, gid in ranked:
        if removed + widths[gid] > budget + 1e-9:
            break
        if counts[gid] < caps[gid]:
            counts[gid] += 1
            removed += widths[gid]
    return counts


def _round_count(group: Group, count: int, round_to: int) -> int:
    """Remove fewer units so the kept channel count (units x width) is a multiple of round_to."""
    step = round_to // math.gcd(round_to, group.width)
    total = _total(group)
    keep = math.ceil((total - count) / step) * step
    return max(0, total - keep) if keep <= total else 0


def _keep_every_space(group: Group, remove: np.ndarray, graph: ChannelGraph) -> np.ndarray:
    """Give back the most important removed units until no channel space would become empty."""
    remove = list(remove)
    while remove:
        dropped: dict[int, int] = {}
        for i in remove:
            for sid, idx in group.units[i].elements.items():
                dropped[sid] = dropped.get(sid, 0) + len(idx)
        if all(n < graph.spaces[sid].size for sid, n in dropped.items()):
            break
        remove.pop()  # the removed unit with the highest score
    return np.array(remove, dtype=np.int64)
