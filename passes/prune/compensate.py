"""Data-aware pruning: consumers of channel spaces, activation importance, and compensation.

A *consumer* is a linear/conv (groups = 1) whose weight (a ``get_attr`` used once) multiplies a
channel space on its input dim (weight dim 1). Removing input channels ``R`` of a consumer with
weight ``W`` (flattened to N × K columns; a conv's column ``c·k_h·k_w + p`` reads channel ``c``)
changes its output by ``W[:, R] x_R``. With ``X`` the calibration rows the consumer multiplies
(see :mod:`fxcompress.statistics`), ``n`` their count, ``μ = Xᵀ1 / n`` and ``G = XᵀX``:

* **importance** ``activation``: a channel scores ``‖W[:, c]‖₂ · ‖x_c‖₂`` (summed over the consumers
  of the unit) — exactly the Frobenius norm of the output it removes (Wanda/FLAP); with
  compensation, ``‖x_c − μ_c‖₂`` instead, since the mean part is compensated.
* **compensate** ``bias`` (FLAP): ``b' = b + W[:, R] μ_R`` — the removed channels' mean contribution.
* **compensate** ``lstsq``: refit the kept columns ``K`` and the bias to reproduce the unpruned
  output on the calibration inputs. With ``x̃ = [x; 1]`` (``G̃`` the Gram matrix of ``x̃``, from
  ``G``, ``Xᵀ1`` and ``n``), ``W̃ = [W, b]`` and ``k = K ∪ {bias}``, minimising
  ``‖W̃ x̃ − W̃'_k x̃_k‖² + λ‖W̃'_k − W̃_k‖²`` gives
  ``W̃'_k = (W̃ G̃[:, k] + λ W̃_k)(G̃[k, k] + λI)⁻¹`` with ``λ = ridge · mean diag G̃[k, k]``.
  A consumer with only diagonal statistics (huge Gram) gets the bias compensation, with the reason.

The new weight and bias are computed on the unpruned tensors (full size) and sliced with the
consumer's kept output and input indices after the pruning rewrite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.passes.prune.graph import ChannelGraph
from fxcompress.passes.prune.ridge import FIXED_FOR_SELECTION, gcv_ridge
from fxcompress.statistics import LAYER_OPS, InputStatistics

COMPENSATIONS = ("bias", "lstsq")


def consumers(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Weight target → the linear/conv (groups 1) node multiplying its input dim by that weight."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LAYER_OPS:
            continue
        args = ir.call_arguments(node)
        weight = args["weight"]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or ir.attr_use_count(gm, weight.target) != 1:
            continue
        if node.target is not torch.ops.aten.linear.default and args["groups"] != 1:
            continue
        found[weight.target] = node
    return found


def channel_importance(weight: torch.Tensor, stats: InputStatistics, centered: bool) -> np.ndarray:
    """Per input channel ``‖W[:, c]‖₂ · ‖x_c‖₂`` (or ``‖x_c − μ_c‖₂`` when ``centered``)."""
    w = weight.detach().double()
    column_norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    activation = stats.centered_channel_norm() if centered else stats.channel_sq.sqrt()
    return (column_norm * activation.to(column_norm)).numpy()


@dataclass
class Compensation:
    node: str
    weight_target: str
    weight: torch.Tensor  # full (unpruned) size
    bias: torch.Tensor
    method: str


def plan(gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray], stats: dict[str, InputStatistics],
         method: str, ridge: float, residual: dict | None = None) -> tuple[list[Compensation], list[dict]]:
    """Compensations for every consumer losing input channels, and one detail row per consumer. ``residual``:
    per consumer, ``D = X̂̃ᵀ(R − R̂)`` of its residual add (:mod:`.residual`), added to the refit target."""
    space_of = {value: sid for sid, value in graph.param_spaces.items()}
    plans, rows = [], []
    for target, node in consumers(gm).items():
        drop = removed.get(space_of.get((target, 1)), np.empty(0, dtype=np.int64))
        if not len(drop):
            continue
        row = {"compensated": ir.module_path(node) or node.name, "removed_inputs": int(len(drop))}
        bias_node = ir.call_arguments(node)["bias"]
        if bias_node is not None and not (bias_node.op == "get_attr" and ir.attr_use_count(gm, bias_node.target) == 1):
            rows.append({**row, "method": "none (the bias is computed or shared)"})
            continue
        if node.name not in stats:
            rows.append({**row, "method": "none (not executed on the calibration data)"})
            continue
        weight = ir.get_attr(gm, target).detach()
        bias = ir.get_attr(gm, bias_node.target).detach() if bias_node is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
        s = stats[node.name]
        used = method if s.gram is not None or method == "bias" else "bias"
        drift = (residual or {}).get(node.name)
        if used == "lstsq":
            new_weight, new_bias, chosen = _refit(weight, bias, s, drop, ridge, drift)
            row.update({"ridge": chosen} if ridge == "gcv" else {})
        else:
            new_weight, new_bias = weight, bias + _removed_mean_output(weight, s, drop).to(bias.dtype)
            if drift is not None:
                new_bias = new_bias + drift.mean.to(bias.dtype)
        rows.append({**row, "method": (used if used == method else f"bias ({s.reason})") + (" + residual" if drift is not None else "")})
        plans.append(Compensation(node.name, target, new_weight.to(weight.dtype), new_bias.to(weight.dtype), used))
    return plans, rows


def feature_columns(channels: np.ndarray, kernel: int) -> torch.Tensor:
    """The unfolded weight columns (``c·kernel + p``) that read the given input channels."""
    return torch.as_tensor((channels[:, None] * kernel + np.arange(kernel)[None, :]).reshape(-1))


def _removed_mean_output(weight: torch.Tensor, s: InputStatistics, drop: np.ndarray) -> torch.Tensor:
    """``W μ_ref − W_K μ_K``: ``W[:, R] μ_R`` when the inputs are the reference's (one-shot); with a reference
    (sequential calibration) also the drift of the kept inputs' means. From the unfolded column means
    when known (exact with padding), else channel means."""
    w = weight.double()
    if s.feature_sum is not None:
        w = w.reshape(w.shape[0], -1)
        mean = s.feature_sum / max(s.rows, 1)
        reference = s.reference_feature_sum / max(s.rows, 1) if s.reference_feature_sum is not None else mean
        kept = mean.clone()
        kept[feature_columns(drop, math.prod(weight.shape[2:]))] = 0
        return w @ (reference - kept)
    per_channel = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)
    return per_channel[:, torch.as_tensor(drop)] @ s.channel_mean[torch.as_tensor(drop)]


def augmented_grams(s: InputStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G̃, C̃)``: the Gram matrix of ``x̂̃ = [x̂; 1]`` and its cross Gram matrix ``x̂̃ᵀx̃`` with the reference
    rows (``C̃ = G̃`` when the statistics were collected without a reference)."""
    features = s.gram.shape[0]

    def augmented(block: torch.Tensor, left_sum: torch.Tensor, right_sum: torch.Tensor) -> torch.Tensor:
        out = torch.empty(features + 1, features + 1, dtype=torch.float64)
        out[:features, :features], out[:features, features], out[features, :features] = block, left_sum, right_sum
        out[features, features] = s.rows
        return out

    gram = augmented(s.gram, s.feature_sum, s.feature_sum)
    if s.cross is None:
        return gram, gram
    return gram, augmented(s.cross, s.feature_sum, s.reference_feature_sum)


def ridge_system(weight: torch.Tensor, bias: torch.Tensor, s: InputStatistics, ridge: float, drift=None):
    """``(G̃ + λI, W̃C̃ᵀ + Dᵀ + λW̃)`` over the augmented columns (``W̃ = [W, b]``; ``D`` the residual drift term,
    0 if ``None``): the refit of any kept set ``k`` is ``W̃'_k = (W̃C̃ᵀ + Dᵀ + λW̃)[:, k] ((G̃ + λI)[k, k])⁻¹``."""
    augmented = torch.cat([weight.double().reshape(weight.shape[0], -1), bias.double()[:, None]], dim=1)
    gram, cross = augmented_grams(s)
    lam = (FIXED_FOR_SELECTION if isinstance(ridge, str) else ridge) * gram.diagonal().mean().clamp(min=1e-12)
    rhs = augmented @ cross.T + lam * augmented + (drift.cross.T if drift is not None else 0)
    return gram + lam * torch.eye(gram.shape[0], dtype=torch.float64), rhs


def _refit(weight: torch.Tensor, bias: torch.Tensor, s: InputStatistics, drop: np.ndarray, ridge: float,
           drift=None):
    """Least squares on the kept columns (``lam`` relative to the kept columns' mean energy, or by GCV for
    ``ridge="gcv"``, :mod:`.ridge`); ``drift``: the residual term ``D`` (a :class:`~.residual.ResidualDrift`)
    added to the target. Returns the weight, the bias and the relative ridge used."""
    w = weight.double().reshape(weight.shape[0], -1)
    kernel, features = math.prod(weight.shape[2:]), w.shape[1]
    keep = np.setdiff1d(np.arange(weight.shape[1]), drop)
    cols = torch.cat([feature_columns(keep, kernel), torch.tensor([features])])
    augmented = torch.cat([w, bias.double()[:, None]], dim=1)
    gram, cross = augmented_grams(s)
    a = gram[cols][:, cols]
    if ridge == "gcv":
        lam, ridge = gcv_ridge(gram, augmented, cols, s.rows)
    else:
        lam = ridge * a.diagonal().mean().clamp(min=1e-12)
    rhs = augmented @ cross[cols].T + lam * augmented[:, cols] + (drift.cross[cols].T if drift is not None else 0)
    refit = torch.linalg.solve(a + lam * torch.eye(len(cols), dtype=torch.float64), rhs.T).T
    new_weight = torch.zeros_like(w)
    new_weight[:, cols[:-1]] = refit[:, :-1]
    return new_weight.reshape(weight.shape), refit[:, -1], ridge


def apply(gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray], plans: list[Compensation]) -> None:
    """After the pruning rewrite: store each consumer's compensated weight and bias, sliced to the kept indices."""
    space_of = {value: sid for sid, value in graph.param_spaces.items()}
    nodes = {n.name: n for n in gm.graph.nodes}
    for p in plans:
        keep = [_kept(p.weight.shape[d], removed.get(space_of.get((p.weight_target, d)))) for d in (0, 1)]
        weight = p.weight.index_select(0, keep[0]).index_select(1, keep[1]).contiguous()
        ir.set_attr(gm, p.weight_target, weight)
        node = nodes[p.node]
        bias_node = ir.call_arguments(node)["bias"]
        bias = p.bias.index_select(0, keep[0]).contiguous()
        if bias_node is not None:
            ir.set_attr(gm, bias_node.target, bias)
        else:
            ir.set_call_argument(node, "bias", ir.add_constant(gm, f"{p.weight_target}_compensation_bias", bias, node))
    if plans:
        ir.finalize(gm)


def _kept(size: int, drop: np.ndarray | None) -> torch.Tensor:
    drop = np.empty(0, dtype=np.int64) if drop is None else drop
    return torch.as_tensor(np.setdiff1d(np.arange(size), drop))
