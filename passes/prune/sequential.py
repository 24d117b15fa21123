"""Sequential calibration and reconstruction importance for ``prune_channels``.

**Sequential** (``sequential=True``; FLAP / SliceGPT / SparseGPT order). The budget (how many units each
group loses) is decided once on the whole model; then the groups are pruned one after another, in the
order of their first consumer in the graph. A stage sees the model with every earlier group already
pruned and compensated (a working copy in which their units are *masked*: every parameter entry of a
removed unit zeroed, which is what removing it computes, and their consumers hold the refit weights).
For the group's consumers it collects the statistics of their inputs ``X̂`` on that copy, paired with
the inputs ``X`` of the original model on the same batch (``X̂ᵀX̂``, ``X̂ᵀX``), chooses the units on them
and refits each consumer to the *original* outputs from the pruned model's inputs:

    min over W'_K  ‖X̃ W̃ᵀ − X̂̃_K W'_Kᵀ‖² + λ‖W'_K − W̃_K‖²
    W'_K = (W̃ C̃[K, :]ᵀ + λ W̃_K)(G̃[K, K] + λI)⁻¹,   G̃ = X̂̃ᵀX̂̃,  C̃ = X̂̃ᵀX̃   (x̃ = [x; 1], W̃ = [W, b])

so each stage also takes out the error the stages before it left, instead of compounding it.

**Reconstruction importance** (``importance="reconstruction"``; Optimal Brain Surgeon over channel
groups, as SlimGPT / ZipLM). With ``H = G̃ + λI`` the refit objective is ``E(W') = E(W*) + tr((W' − W*)
H (W' − W*)ᵀ)`` around its unconstrained minimum ``W* = (W̃C̃ᵀ + λW̃)H⁻¹``, so removing the columns ``R``
of a unit (and refitting the rest) costs ``ΔE = tr(W*_R ([H⁻¹]_RR)⁻¹ W*_Rᵀ)``, summed over the unit's
consumers. Units are removed greedily, least ``ΔE`` first, each removal followed by the OBS update
``W* −= W*_R [H⁻¹]_RR⁻¹ [H⁻¹]_R,:``, ``H⁻¹ −= [H⁻¹]_:,R [H⁻¹]_RR⁻¹ [H⁻¹]_R,:``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.passes.prune import compensate as compensation
from fxcompress.passes.prune.graph import ChannelGraph, Group
from fxcompress.passes.prune.importance import _keep_every_space
from fxcompress.passes.prune.residual import residual_cross
from fxcompress.statistics import InputStatistics, collect_statistics


@dataclass
class _Consumer:
    node: fx.Node
    weight_target: str
    space: int  # the channel space of its input dim


def group_consumers(gm: fx.GraphModule, graph: ChannelGraph) -> list[list[_Consumer]]:
    """Per group, the consumers whose input dim lies in one of its spaces."""
    space_of = {value: sid for sid, value in graph.param_spaces.items()}
    found = [[] for _ in graph.groups]
    group_of = {sid: gid for gid, g in enumerate(graph.groups) for sid in g.spaces}
    for target, node in compensation.consumers(gm).items():
        sid = space_of.get((target, 1))
        if sid in group_of:
            found[group_of[sid]].append(_Consumer(node, target, sid))
    return found


def reconstruction_choice(gm: fx.GraphModule, group: Group, consumers: list[_Consumer], stats: dict[str, InputStatistics],
                          count: int, ridge: float, residual: dict | None = None) -> np.ndarray | None:
    """The ``count`` units of ``group`` whose removal leaves the least refit error (greedy OBS); ``None``
    if a consumer has no Gram matrix (diagonal statistics only) or none ran on the data."""
    systems = []
    for c in consumers:
        s = stats.get(c.node.name)
        if s is None or s.gram is None:
            return None
        systems.append(_ObsSystem(gm, c, s, group, ridge, (residual or {}).get(c.node.name)))
    if not systems:
        return None
    removed: list[int] = []
    for _ in range(min(count, len(group.units))):
        cost = sum(system.costs(len(group.units)) for system in systems)
        cost[torch.as_tensor(removed, dtype=torch.long)] = math.inf
        unit = int(torch.argmin(cost))
        removed.append(unit)
        for system in systems:
            system.remove(unit)
    return np.array(removed, dtype=np.int64)


class _ObsSystem:
    """One consumer's ``W*`` and ``H⁻¹`` (augmented with the bias column), and its columns per unit still there."""

    def __init__(self, gm: fx.GraphModule, consumer: _Consumer, s: InputStatistics, group: Group, ridge: float, drift=None):
        weight = ir.get_attr(gm, consumer.weight_target).detach()
        bias_node = ir.call_arguments(consumer.node)["bias"]
        bias = ir.get_attr(gm, bias_node.target).detach() if bias_node is not None else torch.zeros(weight.shape[0])
        hessian, rhs = compensation.ridge_system(weight, bias, s, ridge, drift)
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        self.weight = rhs @ self.inverse
        kernel = math.prod(weight.shape[2:])
        self.units = [u for u, unit in enumerate(group.units) if consumer.space in unit.elements]
        self.columns = {u: compensation.feature_columns(group.units[u].elements[consumer.space], kernel) for u in self.units}

    def costs(self, units: int) -> torch.Tensor:
        cost = torch.zeros(units, dtype=torch.float64)
        if not self.units:
            return cost
        cols = torch.stack([self.columns[u] for u in self.units])
        if cols.shape[1] == 1:  # single columns: ‖W*_c‖² / [H⁻¹]_cc
            cost[torch.as_tensor(self.units)] = self.weight[:, cols[:, 0]].square().sum(0) / self.inverse.diagonal()[cols[:, 0]]
            return cost
        blocks = self.inverse[cols[:, :, None], cols[:, None, :]]  # U × w × w
        w = self.weight[:, cols].permute(1, 2, 0)  # U × w × N
        cost[torch.as_tensor(self.units)] = (w * torch.linalg.solve(blocks, w)).sum((1, 2))
        return cost

    def remove(self, unit: int) -> None:
        if unit not in self.columns or unit not in self.units:
            return
        self.units.remove(unit)
        cols = self.columns[unit]
        step = torch.linalg.solve(self.inverse[cols][:, cols], self.inverse[cols])  # [H⁻¹]_RR⁻¹ [H⁻¹]_R,:
        self.weight -= self.weight[:, cols] @ step
        self.inverse -= self.inverse[:, cols] @ step


def reselect(gm: fx.GraphModule, graph: ChannelGraph, chosen: list[np.ndarray], stats: dict[str, InputStatistics],
             ridge: float) -> list[np.ndarray]:
    """One-shot reconstruction importance: as many units per group as ``chosen``, picked by greedy OBS."""
    consumers = group_consumers(gm, graph)
    result = []
    for gid, units in enumerate(chosen):
        group = graph.groups[gid]
        greedy = reconstruction_choice(gm, group, consumers[gid], stats, len(units), ridge) if len(units) else None
        result.append(units if greedy is None else _keep_every_space(group, greedy, graph))
    return result


def prune_sequentially(gm: fx.GraphModule, graph: ChannelGraph, chosen: list[np.ndarray], calibration, importance: str,
                       compensate: str | None, ridge: float, centered: bool, residual: bool = False):
    """Re-choose each group's units (as many as in ``chosen``) stage by stage (see the module docstring).

    Returns the units per group, the compensations (full-size, on ``gm``'s weights) and detail rows;
    ``gm`` is not changed."""
    consumers = group_consumers(gm, graph)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    staged = sorted((gid for gid, c in enumerate(consumers) if c and len(chosen[gid])),
                    key=lambda gid: min(position[c.node] for c in consumers[gid]))
    work = copy.deepcopy(gm)
    decided = [units if gid not in staged else units[:0] for gid, units in enumerate(chosen)]
    for gid, units in enumerate(decided):
        _mask(work, graph, graph.groups[gid], units)
    plans, rows = [], []
    for number, gid in enumerate(staged):
        group, stage = graph.groups[gid], consumers[gid]
        work_nodes = {n.name: n for n in work.graph.nodes}
        stage_nodes = [work_nodes[c.node.name] for c in stage]
        stats = collect_statistics(work, calibration, stage_nodes, gram=True, reference=gm)
        drift = residual_cross(work, gm, calibration, stage_nodes) if residual and compensate is not None else {}
        decided[gid] = _stage_choice(gm, group, stage, stats, len(chosen[gid]), importance, ridge, centered, chosen[gid], drift)
        decided[gid] = _keep_every_space(group, decided[gid], graph)
        if compensate is not None:
            stage_plans, stage_rows = compensation.plan(gm, graph, _removed(group, decided[gid]), stats, compensate, ridge, drift)
            plans += stage_plans
            rows += [{**r, "stage": number} for r in stage_rows]
            for p in stage_plans:
                _write(work, work_nodes[p.node], p)
        _mask(work, graph, group, decided[gid])
    return decided, plans, rows


def _stage_choice(gm, group: Group, stage: list[_Consumer], stats: dict, count: int, importance: str, ridge: float,
                  centered: bool, one_shot: np.ndarray, drift: dict) -> np.ndarray:
    if importance == "reconstruction":
        greedy = reconstruction_choice(gm, group, stage, stats, count, ridge, drift)
        if greedy is not None:
            return greedy
    if importance not in ("activation", "reconstruction"):
        return one_shot
    per_channel = {c.space: compensation.channel_importance(ir.get_attr(gm, c.weight_target), stats[c.node.name], centered)
                   for c in stage if c.node.name in stats}
    scores = np.array([sum(float(per_channel[sid][idx].sum()) for sid, idx in unit.elements.items() if sid in per_channel)
                       for unit in group.units])
    return np.argsort(scores, kind="stable")[:count]


def _removed(group: Group, units: np.ndarray) -> dict[int, np.ndarray]:
    parts: dict[int, list[np.ndarray]] = {}
    for u in units:
        for sid, idx in group.units[u].elements.items():
            parts.setdefault(sid, []).append(idx)
    return {sid: np.unique(np.concatenate(p)) for sid, p in parts.items()}


def _mask(work: fx.GraphModule, graph: ChannelGraph, group: Group, units: np.ndarray) -> None:
    """Zero every parameter entry of the removed units: the working copy computes what removing them does."""
    with torch.no_grad():
        for u in units:
            for sid, idx in group.units[u].elements.items():
                if sid in graph.param_spaces:
                    target, dim = graph.param_spaces[sid]
                    ir.get_attr(work, target).index_fill_(dim, torch.as_tensor(idx), 0)


def _write(work: fx.GraphModule, node: fx.Node, plan: compensation.Compensation) -> None:
    ir.set_attr(work, plan.weight_target, plan.weight.clone())
    bias_node = ir.call_arguments(node)["bias"]
    if bias_node is not None:
        ir.set_attr(work, bias_node.target, plan.bias.clone())
    else:
        ir.set_call_argument(node, "bias", ir.add_constant(work, f"{plan.weight_target}_compensation_bias", plan.bias.clone(), node))
