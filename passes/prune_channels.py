"""``prune_channels``: structured channel pruning with dependency propagation.

For every group of coupled channel spaces (see :mod:`fxcompress.passes.prune`) the pass removes the least
important units and rewrites the model so that, for kept index sets ``K``,
``W'_conv = W_conv[K_out][:, K_in]``, ``b' = b[K_out]``, BN/LN/GN parameters and statistics
``p' = p[K]``, embedding tables ``E' = E[:, K]``, head counts and view/reshape sizes follow
``|K|``. Channels feeding the model's outputs, ignored modules or ops the analysis does not
know are kept. With the pruned channels' producing weights zeroed, the original model and
the pruned one compute the same function (except through LayerNorm statistics over pruned
channels).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.fx as fx

from fxcompress.errors import FxCompressWarning, PassConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult, register_pass
from fxcompress.report import count_macs
from fxcompress.selectors import first_match
from fxcompress.passes.prune import compensate as compensation
from fxcompress.passes.prune.allocation import allocate, candidates, pruned_trials
from fxcompress.passes.prune.compensate import COMPENSATIONS
from fxcompress.passes.prune.graph import ChannelGraph, analyze
from fxcompress.passes.prune.importance import IMPORTANCE, choose_units, group_scores
from fxcompress.passes.prune.macs import MacModel
from fxcompress.passes.prune.rewrite import PruningCheck, apply_pruning, check_removal
from fxcompress.passes.prune.ridge import model_ridge
from fxcompress.passes.prune.sequential import prune_sequentially, reselect
from fxcompress.statistics import calibration_batches, layer_statistics

SCOPES = ("local", "global")
RIDGE_CHOICES = ("gcv", "model")
MACS_SEARCH_STEPS = 8
DEFAULT_RATIO = 0.5
EXTREME_RATIO = 0.9


@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove channels, attention heads and hidden features; keep output shapes.

    Give at most one target: ``ratio`` (fraction of each group's channels to remove; with
    ``scope="global"`` the fraction of all channels; default 0.5 when no target is given) or
    ``target_macs`` (fraction of the original multiply-accumulates to keep, found by bisection on
    the ratio). In both scopes no group loses more than ``max_ratio_per_group`` of its channels.
    A ratio of 0.9 or more warns with what is left. ``ignore`` holds module selectors
    (:mod:`fxcompress.selectors`: ``"classifier"`` also covers ``classifier.*``; ``"layer4.*.conv1"``)
    whose parameters stay untouched (node predicates are not plain data, so they are not accepted). ``taylor_loss``
    maps the model's outputs to a scalar for ``importance="taylor"`` (default: sum of squares).
    ``importance="activation"`` scores channels by weight × input activation norm on the calibration
    data; ``compensate`` ("bias" | "lstsq", ridge ``ridge``) rewrites the layers reading pruned channels
    to reproduce their unpruned outputs on it (see :mod:`fxcompress.passes.prune.compensate`).
    ``importance="reconstruction"`` (with ``compensate="lstsq"``) removes, in each group, the units whose
    removal leaves the least error after the refit (greedy Optimal Brain Surgeon); the number per group
    is chosen by activation importance. ``sequential=True`` prunes the groups one after another, each
    calibrated on the model with the earlier groups already pruned and refit to the original outputs
    (see :mod:`fxcompress.passes.prune.sequential`); the budget is the one-shot one. With ``residual=True``
    (sequential, with ``compensate``) a consumer whose output goes into a residual add is refit to the
    original *sum* — its own output plus the original residual — so it also takes out the error earlier
    stages left in the residual stream (see :mod:`fxcompress.passes.prune.residual`). ``ridge`` (the refit's
    pull toward the original weights, relative to the mean input energy) may be chosen from the data:
    ``"gcv"`` per layer by generalized cross-validation, ``"model"`` (one-shot only) as the candidate whose
    pruned model best reproduces the original outputs on calibration batches (see :mod:`fxcompress.passes.prune.ridge`).
    ``attention``: the unit of grouped-query attention — ``"kv_groups"`` (default) removes a key/value head with all its query heads,
    ``"query_heads"`` keeps every key/value head and removes the same number of query heads from every group
    (where the key/value heads are repeated by ``expand`` + ``reshape``, transformers' ``repeat_kv``;
    ``repeat_interleave`` and ``sdpa(enable_gqa=True)`` still prune whole groups).
    ``allocation="model"`` (one-shot, local scope) shares the ratio's MAC budget between kinds of groups (attention
    heads, single channels) by the pruned model's output error on held-out calibration batches
    (see :mod:`fxcompress.passes.prune.allocation`).
    """

    name: ClassVar[str] = "prune_channels"
    lossless: ClassVar[bool] = False

    ratio: float | None = None
    target_macs: float | None = None
    importance: str = "l1"
    scope: str = "local"
    max_ratio_per_group: float = 0.9
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    prune_outputs: bool = False
    taylor_loss: Callable[[Any], torch.Tensor] | None = None
    seed: int = 0
    compensate: str | None = None
    ridge: float | str = 1e-3
    group_ratios: tuple[tuple[str, float], ...] = ()
    sequential: bool = False
    residual: bool = False
    attention: str = "kv_groups"
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_ratios", _checked_group_ratios(self.group_ratios))
        if self.group_ratios and (self.target_macs is not None or self.scope != "local"):
            raise PassConfigError("prune_channels: group_ratios= overrides ratio= per group in scope='local'; "
                                  "it cannot be combined with target_macs= or scope='global'")
        if isinstance(self.ignore, str) or isinstance(self.ignore, list):
            object.__setattr__(self, "ignore", (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore))
        if self.ratio is None and self.target_macs is None:
            object.__setattr__(self, "ratio", 0.0 if self.group_ratios else DEFAULT_RATIO)
        if self.ratio is not None and self.target_macs is not None:
            raise PassConfigError(
                "prune_channels takes one target, not both: ratio= (fraction of channels to remove, e.g. 0.5) "
                "or target_macs= (fraction of the original MACs to keep, e.g. 0.5)"
            )
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise PassConfigError(f"ratio={self.ratio} must be in [0, 1): the fraction of channels to remove")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise PassConfigError(f"target_macs={self.target_macs} must be in (0, 1]: the fraction of MACs to keep")
        if self.importance not in IMPORTANCE:
            raise PassConfigError(f"importance={self.importance!r} is unknown; use one of {', '.join(IMPORTANCE)}")
        if self.attention not in ("kv_groups", "query_heads"):
            raise PassConfigError(f"attention={self.attention!r} is unknown; use 'kv_groups' (prune whole key/value groups) "
                                  "or 'query_heads' (the same number of query heads in every group)")
        if self.scope not in SCOPES:
            raise PassConfigError(f"scope={self.scope!r} is unknown; use 'local' or 'global'")
        if not 0 < self.max_ratio_per_group <= 1:
            raise PassConfigError(f"max_ratio_per_group={self.max_ratio_per_group} must be in (0, 1]")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise PassConfigError(f"round_to={self.round_to!r} must be a positive int, e.g. 8")
        if not all(isinstance(p, str) for p in self.ignore):
            raise PassConfigError("ignore= takes module names or globs (strings), e.g. ('classifier', 'layer4.*')")
        if self.compensate is not None and self.compensate not in COMPENSATIONS:
            raise PassConfigError(f"compensate={self.compensate!r} is unknown; use None or one of {COMPENSATIONS}")
        if self.importance == "reconstruction" and self.compensate != "lstsq":
            raise PassConfigError("importance='reconstruction' scores the error left after the least-squares refit; "
                                  "use it with compensate='lstsq'")
        if self.sequential and self.importance not in ("activation", "reconstruction") and self.compensate is None:
            raise PassConfigError("sequential=True recomputes data-aware choices stage by stage; use it with "
                                  "importance='activation'/'reconstruction' or a compensate= method")
        if self.residual and not (self.sequential and self.compensate is not None):
            raise PassConfigError("residual=True refits consumers to the original residual sum on the pruned model's "
                                  "inputs; use it with sequential=True and a compensate= method")
        if self.ridge not in RIDGE_CHOICES and (isinstance(self.ridge, bool) or not isinstance(self.ridge, int | float) or not self.ridge >= 0):
            raise PassConfigError(f"ridge={self.ridge!r} must be a number >= 0 (relative to the mean input energy, e.g. 1e-3), "
                                  "'gcv' (per layer, by generalized cross-validation) or 'model' (the model's output error on "
                                  "calibration batches)")
        if self.ridge == "model" and self.sequential:
            raise PassConfigError("ridge='model' compares one-shot refits of the whole model; with sequential=True give a "
                                  "number or ridge='gcv'")
        if self.allocation not in ("uniform", "model"):
            raise PassConfigError(f"allocation={self.allocation!r} is unknown; use 'uniform' (every group at the ratio) "
                                  "or 'model' (heads vs channels chosen by the output error on calibration batches)")
        if self.allocation == "model" and (self.sequential or self.scope != "local" or self.group_ratios
                                           or self.importance == "reconstruction"):
            raise PassConfigError("allocation='model' compares one-shot prunings at local scope; drop sequential=True, "
                                  "scope='global', group_ratios= and importance='reconstruction'")
        if self.taylor_loss is not None and not callable(self.taylor_loss):
            raise PassConfigError("taylor_loss must be a callable mapping the model outputs to a scalar tensor")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = analyze(gm, self.ignore, self.prune_outputs, query_heads=self.attention == "query_heads")
        result = PassResult(changed=False, skipped=list(graph.blocked) + frozen_summary(graph))
        stats = self._statistics(gm, ctx)
        budget_importance = "activation" if self.importance == "reconstruction" else self.importance  # how many per group
        scores = group_scores(gm, graph, budget_importance, ctx, self.taylor_loss, self.seed, stats, self.compensate is not None)
        summary: dict[str, Any] = {"groups": len(graph.groups), "prunable_groups": sum(bool(g.units) for g in graph.groups)}
        if self.target_macs is None:
            ratio = self.ratio
            chosen, removed, refused, check = checked_removal(gm, graph, self._choose(graph, scores, ratio))
        else:
            ratio, (chosen, removed, refused, check), summary["macs_before"], summary["macs_after"] = self._search_ratio(gm, graph, scores, ctx)
        summary["ratio"] = ratio
        result.skipped += refused
        compensations, rows = [], []
        if self.sequential:
            chosen, compensations, rows = prune_sequentially(gm, graph, chosen, calibration_batches(ctx), self.importance,
                                                             self.compensate, self.ridge, self.compensate is not None, self.residual)
        elif self.importance == "reconstruction":
            chosen = reselect(gm, graph, chosen, stats, self.ridge)
        if self.sequential or self.importance == "reconstruction":
            chosen, removed, compensations, refused, check = _recheck(gm, graph, chosen, compensations)
            result.skipped += refused
        ridge = self.ridge
        if self.allocation == "model" and removed:
            chosen, removed, refused, check, ridge = self._allocate(gm, graph, scores, ratio, ctx, removed, summary)
            result.skipped += refused
        if self.compensate and not self.sequential:
            if ridge == "model" and removed:
                ridge, errors = model_ridge(gm, lambda fit: self._trial(gm, graph, removed, fit), list(calibration_batches(ctx)))
                summary.update(ridge=ridge, ridge_errors=errors)
            compensations, rows = compensation.plan(gm, graph, removed, stats, self.compensate, ridge)
        result.details = [summary] + _group_details(graph, chosen) + rows
        if removed:
            result.rewritten = apply_pruning(gm, graph, removed, check=check)
            compensation.apply(gm, graph, removed, compensations)
            result.changed = True
        if ratio >= EXTREME_RATIO:
            _warn_extreme(ratio, result.details[1:], gm)
        return result

    def _trial(self, gm: fx.GraphModule, graph: ChannelGraph, removed: dict, fit: list) -> Callable[[float], fx.GraphModule]:
        """``ridge → `` a pruned copy of ``gm`` compensated with that relative ridge on the statistics of the
        ``fit`` batches (``ridge="model"``)."""
        trial = pruned_trials(gm, graph, fit, self.compensate)
        return lambda ridge: trial(removed, ridge)

    def _allocate(self, gm, graph: ChannelGraph, scores, ratio: float, ctx: PassContext, removed: dict, summary: dict):
        """``allocation="model"``: the units, removal, refusals, check and ridge of the best candidate allocation."""
        model = MacModel(gm, graph, ctx)
        if not model.exact:
            summary["allocation"] = "uniform: the MAC model cannot re-evaluate this graph's counted nodes"
            return (*checked_removal(gm, graph, self._choose(graph, scores, ratio)), self.ridge)
        options = candidates(graph, scores, ratio, self.max_ratio_per_group, self.round_to,
                             lambda chosen: model.macs(removed_indices(graph, chosen)))
        key, ridge, found = allocate(gm, graph, options, lambda chosen: checked_removal(gm, graph, chosen)[1],
                                     list(calibration_batches(ctx)), self.compensate, self.ridge, removed)
        summary.update(found)
        return (*checked_removal(gm, graph, options[key]), ridge)

    def _choose(self, graph: ChannelGraph, scores, ratio: float) -> list[np.ndarray]:
        """The units to remove per group; with ``group_ratios`` each group at its own ratio (local scope
        chooses every group independently, so one choice per distinct ratio is exact)."""
        if not self.group_ratios:
            return choose_units(graph, scores, ratio, self.scope, self.max_ratio_per_group, self.round_to)
        selectors = [s for s, _ in self.group_ratios]
        per_group = [dict(self.group_ratios).get(first_match(selectors, group_name(graph, g)), ratio) for g in graph.groups]
        by_ratio = {r: choose_units(graph, scores, r, self.scope, self.max_ratio_per_group, self.round_to) for r in set(per_group)}
        return [by_ratio[r][i] for i, r in enumerate(per_group)]

    def _statistics(self, gm: fx.GraphModule, ctx: PassContext) -> dict:
        """Input statistics of the layers reading prunable channels, if importance or compensation needs them."""
        if self.importance != "activation" and self.compensate is None:
            return {}
        layers = list(compensation.consumers(gm).values())
        one_shot_refit = self.compensate == "lstsq" and not self.sequential  # sequential collects its own, per stage
        return layer_statistics(gm, ctx, layers, gram=one_shot_refit)

    def _search_ratio(self, gm, graph: ChannelGraph, scores, ctx: PassContext) -> tuple[float, tuple, int, int]:
        """Smallest ratio whose pruned model has at most ``target_macs`` of the original MACs, bisected over
        the MACs predicted from the channel counts (:class:`~fxcompress.passes.prune.macs.MacModel`); groups
        whose rewrite is refused are kept whole and the bisection is redone without them."""
        model = MacModel(gm, graph, ctx)
        if not model.exact:
            return self._search_ratio_on_copies(gm, graph, scores, ctx, model.total)
        excluded: set[int] = set()
        refusals: list[tuple[str, str]] = []
        while True:
            ratio = self._bisect(lambda r: model.macs(removed_indices(graph, self._without(graph, scores, r, excluded))), model.total)
            chosen = self._without(graph, scores, ratio, excluded)
            kept, removed, refused, check = checked_removal(gm, graph, chosen)
            refusals += refused
            if not refused:
                return ratio, (kept, removed, refusals, check), model.total, model.macs(removed)
            excluded |= {gid for gid, (a, b) in enumerate(zip(chosen, kept)) if len(a) and not len(b)}

    def _without(self, graph: ChannelGraph, scores, ratio: float, excluded: set[int]) -> list[np.ndarray]:
        chosen = choose_units(graph, scores, ratio, self.scope, self.max_ratio_per_group, self.round_to)
        return [units[:0] if gid in excluded else units for gid, units in enumerate(chosen)]

    def _bisect(self, macs_at: Callable[[float], int], before: int) -> float:
        low, high = 0.0, self.max_ratio_per_group
        for _ in range(MACS_SEARCH_STEPS):
            mid = (low + high) / 2
            if macs_at(mid) <= self.target_macs * before:
                high = mid
            else:
                low = mid
        return high

    def _search_ratio_on_copies(self, gm, graph: ChannelGraph, scores, ctx: PassContext, before: int) -> tuple[float, tuple, int, int]:
        """The bisection measured on pruned copies, for graphs whose counted nodes the MAC model cannot
        re-evaluate (a higher-order op, a submodule call)."""
        def macs_at(ratio: float) -> int:
            trial = copy.deepcopy(gm)
            _, removed, _ = consistent_removal(trial, graph, self._without(graph, scores, ratio, set()))
            if removed:
                apply_pruning(trial, graph, removed, refresh_meta=False)
            return count_macs(trial, ctx)

        ratio = self._bisect(macs_at, before)
        return ratio, checked_removal(gm, graph, self._without(graph, scores, ratio, set())), before, macs_at(ratio)


def _recheck(gm, graph: ChannelGraph, chosen: list[np.ndarray], compensations: list):
    """The refusal and shape check again for re-chosen units; a refused group's consumers lose their compensation."""
    kept, removed, refused, check = checked_removal(gm, graph, chosen)
    space_of = {value: sid for sid, value in graph.param_spaces.items()}
    compensations = [p for p in compensations if len(removed.get(space_of.get((p.weight_target, 1)), ()))]
    return kept, removed, compensations, refused, check


def group_name(graph: ChannelGraph, group) -> str:
    """A coupled group's name: its first parameter (what ``group_ratios`` selects and the details show)."""
    params = [graph.param_spaces[s][0] for s in group.spaces if s in graph.param_spaces]
    return params[0] if params else f"group{graph.groups.index(group)}"


def _checked_group_ratios(value: Any) -> tuple[tuple[str, float], ...]:
    pairs = tuple(value.items()) if isinstance(value, dict) else value
    try:
        checked = tuple((str(name), float(r)) for name, r in pairs)
    except (TypeError, ValueError) as exc:
        raise PassConfigError(f"prune_channels: group_ratios must be (group selector, ratio) pairs or a dict: {exc}") from exc
    bad = [(n, r) for n, r in checked if not 0 <= r < 1]
    if bad:
        raise PassConfigError(f"prune_channels: group ratios must be in [0, 1) (fraction of the group's channels to remove); got {bad[:3]}")
    return checked


def removed_indices(graph: ChannelGraph, chosen: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Per channel space, the sorted indices the chosen units remove."""
    removed: dict[int, list[np.ndarray]] = {}
    for group, units in zip(graph.groups, chosen):
        for u in units:
            for sid, idx in group.units[u].elements.items():
                removed.setdefault(sid, []).append(idx)
    return {sid: np.unique(np.concatenate(parts)) for sid, parts in removed.items()}


def consistent_removal(
    gm: fx.GraphModule, graph: ChannelGraph, chosen: list[np.ndarray]
) -> tuple[list[np.ndarray], dict[int, np.ndarray], list[tuple[str, str]]]:
    """The chosen units without those of every group whose rewrite is refused (see
    :func:`~fxcompress.passes.prune.refusal`), their removed indices, and one reason per refusal."""
    return checked_removal(gm, graph, chosen)[:3]


def checked_removal(
    gm: fx.GraphModule, graph: ChannelGraph, chosen: list[np.ndarray]
) -> tuple[list[np.ndarray], dict[int, np.ndarray], list[tuple[str, str]], PruningCheck | None]:
    """:func:`consistent_removal` and the shape check of the removal it keeps (``None`` if nothing is removed)."""
    chosen, refused, check = list(chosen), [], None
    while removed := removed_indices(graph, chosen):
        check = check_removal(gm, graph, removed)
        if check.problem is None:
            break
        node, reason = check.problem
        hit = _groups_at(gm, graph, node, chosen)
        for gid in hit:
            chosen[gid] = chosen[gid][:0]
        refused.append((node, f"pruning refused ({reason}); {len(hit)} channel group(s) kept whole"))
        check = None
    return chosen, removed, refused, check


def _groups_at(gm: fx.GraphModule, graph: ChannelGraph, node_name: str, chosen: list[np.ndarray]) -> list[int]:
    """Groups losing units whose channels pass through ``node_name`` (its inputs or outputs); all of them if none."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    names = {node.name} | {n.name for n in node.all_input_nodes}
    losing = [gid for gid, units in enumerate(chosen) if len(units)]
    hit = [gid for gid in losing if any(graph.spaces[s].node in names for s in graph.groups[gid].spaces)]
    return hit or losing


def frozen_summary(graph: ChannelGraph) -> list[tuple[str, str]]:
    """One ``(example, what)`` entry per reason units of parameterized groups were kept whole."""
    return [
        (row["example"], f"{row['units']} units ({row['channels']} channels) kept whole: {reason}")
        for reason, row in sorted(graph.frozen.items(), key=lambda kv: -kv[1]["channels"])
    ]


def _warn_extreme(ratio: float, groups: list[dict], gm: fx.GraphModule) -> None:
    fewest = min(groups, key=lambda d: d["kept_channels"], default=None)
    where = f"; fewest in a group: {fewest['kept_channels']} channels ({fewest['group']})" if fewest else ""
    warnings.warn(
        f"prune_channels: ratio={ratio:.3g} removes nearly everything: {sum(p.numel() for p in gm.parameters())} "
        f"parameters are left{where}. Use a ratio below {EXTREME_RATIO} and recover with fxcompress.distill.",
        FxCompressWarning, stacklevel=2,
    )


def _group_details(graph: ChannelGraph, chosen: list[np.ndarray]) -> list[dict]:
    details = []
    for group, units in zip(graph.groups, chosen):
        if not len(units):
            continue
        params = list(dict.fromkeys(graph.param_spaces[s][0] for s in group.spaces if s in graph.param_spaces))
        total = len(group.units) + group.frozen_units
        details.append({
            "group": group_name(graph, group),
            "params": len(params),
            "units": total,
            "removed_units": int(len(units)),
            "unit_width": group.width,
            "kept_channels": (total - len(units)) * group.width,
        })
    return details


__all__ = ["PruneChannels", "checked_removal", "consistent_removal", "frozen_summary", "group_name", "removed_indices"]
