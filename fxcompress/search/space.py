"""The search space: sites (coupled channel groups, layers), their options, and options → a pipeline.

A *prune site* is one coupled channel group of ``prune_channels`` (named by its first parameter);
its options are the fractions of its channels to remove. A *layer site* is one linear/conv layer
that ``low_rank`` can make cheaper or ``int8`` rewrites; its options are every combination of a rank
fraction (or full rank) and int8 on/off, measured together because they act on the same weights.
The sites are found by running each pass once, at its strongest setting, on a copy of the base graph
(an option that then changes nothing saves nothing and is never chosen).
A set of settings becomes a plain pipeline: ``FoldBN``-style lossless passes, then
``PruneChannels(group_ratios=...)``, ``LowRank(layer_ranks=...)``, ``Int8(skip=...)``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import FxCompressWarning
from ..manager import apply_pass
from ..pass_base import Pass, PassContext
from ..registry import make_pass

LOSSLESS = ("eliminate_identity", "fold_bn")


@dataclass(frozen=True)
class Setting:
    """One option of one site: ``ratio`` for a prune site; ``rank`` (``None``: full) and ``int8`` for a layer."""

    site: str
    kind: str  # "prune" or "layer"
    ratio: float = 0.0
    rank: float | None = None
    int8: bool = False

    def label(self) -> str:
        if self.kind == "prune":
            return f"prune {self.ratio:g}"
        parts = ([f"rank {self.rank:g}"] if self.rank is not None else []) + (["int8"] if self.int8 else [])
        return " + ".join(parts)


@dataclass
class Site:
    name: str
    kind: str
    options: list[Setting] = field(default_factory=list)


@dataclass
class Space:
    """The sites found on the base graph, and the layers ``int8`` must skip unless a setting turns them on."""

    sites: list[Site]
    int8_layers: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()

    def pipeline(self, settings: list[Setting], lossless: bool = True) -> list[Pass]:
        """The lossless passes (unless ``lossless=False``), then one configured pass per kind of setting present."""
        passes = [make_pass(name) for name in LOSSLESS] if lossless else []
        prune = tuple((s.site, s.ratio) for s in settings if s.kind == "prune" and s.ratio > 0)
        ranks = tuple((s.site, s.rank) for s in settings if s.kind == "layer" and s.rank is not None)
        int8_on = {s.site for s in settings if s.kind == "layer" and s.int8}
        if prune:
            passes.append(make_pass("prune_channels", ratio=0.0, group_ratios=prune))
        if ranks:
            passes.append(make_pass("low_rank", layer_ranks=ranks))
        if int8_on:
            skip = tuple(sorted(set(self.int8_layers + self.float_layers) - int8_on))
            passes.append(make_pass("int8", skip=skip))
        return passes


def apply(base: fx.GraphModule, passes: list[Pass], ctx: PassContext) -> fx.GraphModule:
    """A copy of ``base`` (not changed) with ``passes`` applied, each cleaned up after as the pass manager
    does (:func:`~fxcompress.manager.apply_pass`: hooks, dead code, lint, recompile) but without the
    manager's model runs and checks: a candidate is measured by the search, and the chosen pipeline is
    built again, verified, by ``optimize``. The passes' warnings about a candidate are not the user's
    (only the chosen pipeline warns)."""
    gm = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        for pass_ in passes:
            apply_pass(pass_, gm, ctx)
    return gm


def find_space(base: fx.GraphModule, ctx: PassContext, kinds: tuple[str, ...], prune_ratios: tuple[float, ...],
               ranks: tuple[float, ...]) -> Space:
    """Run each searched pass once on a copy of ``base`` to list what it can change: the sites."""
    sites: list[Site] = []
    int8_layers: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()
    if "prune_channels" in kinds:
        result = _probe(base, ctx, make_pass("prune_channels", ratio=max(prune_ratios)))
        groups = [row["group"] for row in result.details[1:] if "group" in row and row.get("removed_units")]
        sites += [Site(g, "prune", [Setting(g, "prune", ratio=r) for r in sorted(prune_ratios)]) for g in groups]
    factorable: list[str] = []
    if "low_rank" in kinds:
        result = _probe(base, ctx, make_pass("low_rank", rank=min(ranks)))
        factorable = [row["layer"] for row in result.details if "layer" in row]
    if "int8" in kinds:
        result = _probe(base, ctx, make_pass("int8"))
        int8_layers = tuple(dict.fromkeys(result.rewritten))
        float_layers = tuple(dict.fromkeys(t for t, _ in result.skipped if t not in int8_layers))
    for layer in dict.fromkeys(factorable + list(int8_layers)):
        rank_options = [None] + (sorted(ranks, reverse=True) if layer in factorable else [])
        int8_options = [False, True] if layer in int8_layers else [False]
        options = [Setting(layer, "layer", rank=r, int8=q) for r in rank_options for q in int8_options if r is not None or q]
        sites.append(Site(layer, "layer", options))
    return Space(sites, int8_layers, float_layers)


def _probe(base: fx.GraphModule, ctx: PassContext, pass_: Pass):
    gm = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        return pass_.run(gm, ctx)
