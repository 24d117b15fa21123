"""Sensitivity analysis: every option of every site applied alone to the base graph, its error measured.

Error by default is ``1 − cosine`` of the candidate's outputs against the base graph's on the
calibration batches (:func:`fxcompress.verify.fidelity`, the pass manager's measure); with a
``metric`` (quality, higher is better) it is the drop of the metric. For small independent
perturbations both add up over sites (``1 − cos ≈ ½‖δ‖²/‖y‖²``), which is what the allocator assumes.
Each option's graph is also profiled for the cost model. A whole analysis is cached in the process
(:mod:`.cache`), so several targets on one model (the benchmark's 0.7/0.5/0.35) measure once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..pass_base import PassContext
from ..quiet import progress_bar
from ..training import Batch
from ..verify import fidelity
from .cost_model import CostModel, GraphProfile, static_costs
from .space import Setting, Space, apply

class ErrorMeter:
    """The error of a graph relative to the base graph: ``1 − cosine`` on the batches, or a metric drop."""

    def __init__(self, base: fx.GraphModule, batches: list[Batch], metric: Callable[[Any], float] | None):
        self.batches, self.metric = batches, metric
        self.reference = self._outputs(base) if metric is None else None
        self.base_quality = float(metric(base)) if metric is not None else None

    def _outputs(self, gm: fx.GraphModule) -> list:
        with torch.no_grad():
            return [gm(*b.args, **b.kwargs) for b in self.batches]

    def __call__(self, gm: fx.GraphModule) -> float:
        if self.metric is not None:
            return self.base_quality - float(self.metric(gm))
        cosine = fidelity(self.reference, self._outputs(gm)).cosine
        return 1.0 - cosine if cosine == cosine else float("inf")


@dataclass
class Measured:
    """One option applied alone: its error and its graph's cost profile."""

    setting: Setting
    error: float
    profile: GraphProfile


@dataclass
class Built:
    """A pipeline built on the input graph and measured: error, size and MACs (fractions of the input
    model), and its latency fraction once timed. Kept with the analysis, so later targets reuse it."""

    gm: fx.GraphModule
    error: float
    size: float
    macs: float
    latency: float | None = None


@dataclass
class Analysis:
    """Everything measured on one model: the space, the base graph's profile, every option's measurement."""

    space: Space
    base: GraphProfile
    input: GraphProfile
    options: dict[Setting, Measured] = field(default_factory=dict)
    failed: dict[Setting, str] = field(default_factory=dict)
    unmeasured: list[Setting] = field(default_factory=list)
    seconds: float = 0.0
    built: dict[str, "Built"] = field(default_factory=dict)  # pipeline configs (JSON) -> the built candidate


def analyze(base: fx.GraphModule, input_gm: fx.GraphModule, ctx: PassContext, space: Space, meter: ErrorMeter,
            costs: CostModel | None, time_budget_s: float | None = None, progress: bool | None = None) -> Analysis:
    """Measure every option of ``space`` alone on ``base`` (until ``time_budget_s``), then time the nodes
    of all option graphs, of ``base`` and of the input graph together (no timing without ``costs``:
    a size or MACs budget is counted)."""
    start = time.perf_counter()

    def profile(gm: fx.GraphModule) -> GraphProfile:
        return static_costs(gm, ctx, costs.profile(gm, ctx.args, ctx.kwargs) if costs is not None else GraphProfile([]))

    profiles = [profile(gm) for gm in (base, input_gm)]
    analysis = Analysis(space, *profiles)
    settings = [s for site in space.sites for s in site.options]
    with progress_bar(progress, total=len(settings), desc="sensitivity", unit="option") as bar:
        for setting in settings:
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                analysis.unmeasured.append(setting)
                continue
            bar.set_postfix_str(f"{setting.site}: {setting.label()}"[-40:])
            try:
                gm = apply(base, space.pipeline([setting], lossless=False), ctx)
            except Exception as exc:  # an option a pass cannot apply is dropped, with its reason
                analysis.failed[setting] = f"{type(exc).__name__}: {exc}"
                bar.update(1)
                continue
            analysis.options[setting] = Measured(setting, meter(gm), profile(gm))
            bar.update(1)
    if costs is not None:
        costs.measure(lambda: ctx.run(base), analysis.base)
    analysis.seconds = time.perf_counter() - start
    return analysis
