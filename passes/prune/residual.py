"""Residual-aware refit targets for sequential pruning (``PruneChannels(sequential=True, residual=True)``).

A consumer whose output goes straight into a residual add, ``z = (W x + b) + r``, is followed by a
term the refit can see: in a sequential stage the pruned model's residual ``r̂`` differs from the
original ``r`` by the error the earlier stages left in the residual stream. Refitting the consumer to
the original *sum* (the block output before its norm) instead of to its own original output,

    min over W'_K  ‖X̃ W̃ᵀ + R − R̂ − X̂̃_K W'_Kᵀ‖² + λ‖W'_K − W̃_K‖²
    W'_K = (W̃ C̃[K, :]ᵀ + D[K, :]ᵀ + λ W̃_K)(G̃[K, K] + λI)⁻¹,   D = X̂̃ᵀ(R − R̂)   (x̃ = [x; 1])

lets each block take out the part of the upstream error that is linear in its inputs, instead of
passing it on. ``D`` is accumulated here over the calibration batches (the pruned working copy and the
original run side by side, each stopped once the watched values exist; padding rows excluded like
the other statistics). A consumer whose output is not the operand of a plain ``add`` of the same shape
keeps the plain target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.statistics import LAYER_OPS, ValueRecorder, flat_inputs, kept_tokens, layer_features
from fxcompress.training import Batch


def residual_operands(gm: fx.GraphModule, consumers: Iterable[fx.Node]) -> dict[str, fx.Node]:
    """Consumer name → the other operand of the residual ``add`` its output (its only use) goes into."""
    found = {}
    for node in consumers:
        users = list(node.users)
        if len(users) != 1 or users[0].target is not torch.ops.aten.add.Tensor:
            continue
        add = ir.call_arguments(users[0])
        other = add["other"] if add["self"] is node else add["self"]
        if add["alpha"] == 1 and isinstance(other, fx.Node) and other is not node and ir.fake_shape(other) == ir.fake_shape(node):
            found[node.name] = other
    return found


@dataclass
class ResidualDrift:
    """``cross = X̂̃ᵀ(R − R̂)`` ((K + 1) × N, last row ``1ᵀ(R − R̂)``) over ``rows`` output rows."""

    cross: torch.Tensor
    rows: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.cross[-1] / max(self.rows, 1)


def output_rows(node: fx.Node, y: torch.Tensor) -> torch.Tensor:
    """A layer's output as rows matching :func:`~fxcompress.statistics.layer_features` (tokens / positions × N)."""
    return (y.movedim(1, -1) if LAYER_OPS[node.target] else y).reshape(-1, y.shape[1 if LAYER_OPS[node.target] else -1])


@torch.no_grad()
def residual_cross(work: fx.GraphModule, reference: fx.GraphModule, batches: Iterable[Any],
                   consumers: list[fx.Node]) -> dict[str, ResidualDrift]:
    """Per consumer of ``work`` with a residual add (by node name), the drift term ``D`` of its refit."""
    operands = residual_operands(work, consumers)
    layers = {n.name: n for n in consumers if n.name in operands}
    if not layers:
        return {}
    inputs = {name: ir.call_arguments(n)["input"].name for name, n in layers.items()}
    work_run = ValueRecorder(work, set(inputs.values()) | {operands[name].name for name in layers})
    reference_run = ValueRecorder(reference, {operands[name].name for name in layers})
    drift = {name: ResidualDrift(torch.zeros(0)) for name in layers}
    for item in batches:
        batch = item if isinstance(item, Batch) else Batch.of(item)
        mask = batch.kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) else None
        pruned = work_run.record(*flat_inputs(batch, getattr(work, "_in_spec", None)))
        original = reference_run.record(*flat_inputs(batch, getattr(reference, "_in_spec", None)))
        for name, node in layers.items():
            x, residual = pruned[inputs[name]], operands[name].name
            keep = kept_tokens(x, mask) if not LAYER_OPS[node.target] else None
            rows = layer_features(node, x.float())
            delta = output_rows(node, (original[residual] - pruned[residual]).float())
            if keep is not None:
                rows, delta = rows[keep], delta[keep]
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
            term = (rows.T @ delta).double()
            drift[name].cross = term + drift[name].cross if drift[name].rows else term
            drift[name].rows += rows.shape[0]
    return drift
