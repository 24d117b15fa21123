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
from torch.utils import _pytree as pytree

from ..pass_base import PassContext
from ..quiet import progress_bar
from ..training import Batch
from ..verify import fidelity
from .cost_model import CostModel, GraphProfile, static_costs
from .space import Setting, Space, apply

class ErrorMeter:
    """The error of a graph relative to the base graph: ``1 − cosine`` on the batches, or a metric drop.

    A batch that is the example inputs (the default when no calibration is given; often the first
    calibration batch) is not run again when the caller has the graph's outputs on them already."""

    def __init__(self, base: fx.GraphModule, batches: list[Batch], metric: Callable[[Any], float] | None,
                 example: Batch | None = None):
        self.batches, self.metric = batches, metric
        self.example_index = next((i for i, b in enumerate(batches) if example is not None and _same_batch(b, example)), None)
        self.reference = self._outputs(base) if metric is None else None
        self.base_quality = float(metric(base)) if metric is not None else None

    def _outputs(self, gm: fx.GraphModule, example_outputs: Any = None) -> list:
        with torch.no_grad():
            return [example_outputs if i == self.example_index and example_outputs is not None else gm(*b.args, **b.kwargs)
                    for i, b in enumerate(self.batches)]

    def __call__(self, gm: fx.GraphModule, example_outputs: Any = None) -> float:
        """``example_outputs``: ``gm``'s outputs on the example inputs, if the caller has them."""
        if self.metric is not None:
            return self.base_quality - float(self.metric(gm))
        cosine = fidelity(self.reference, self._outputs(gm, example_outputs)).cosine
        return 1.0 - cosine if cosine == cosine else float("inf")


def _same_batch(a: Batch, b: Batch) -> bool:
    flat_a, spec_a = pytree.tree_flatten((a.args, a.kwargs))
    flat_b, spec_b = pytree.tree_flatten((b.args, b.kwargs))
    return spec_a == spec_b and all(
        x is y or isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
        and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(flat_a, flat_b))


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
            costs: CostModel | None, macs: bool, time_budget_s: float | None = None, progress: bool | None = None) -> Analysis:
    """Measure every option of ``space`` alone on ``base`` (until ``time_budget_s``), then time the nodes
    of all option graphs, of ``base`` and of the input graph together (no timing without ``costs``:
    a size or MACs budget is counted; MACs are counted only with ``macs``)."""
    start = time.perf_counter()

    def profile(gm: fx.GraphModule) -> tuple[GraphProfile, Any]:
        profiled, outputs = costs.profile(gm, ctx.args, ctx.kwargs) if costs is not None else (GraphProfile([]), None)
        return static_costs(gm, ctx, profiled, macs), outputs

    analysis = Analysis(space, profile(base)[0], profile(input_gm)[0])
    settings = [s for site in space.sites for s in site.options]
    with progress_bar(progress, total=len(settings), desc="sensitivity", unit="option") as bar:
        for setting in settings:
            bar.set_postfix_str(f"{setting.site}: {setting.label()}"[-40:])
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                analysis.unmeasured.append(setting)
            else:
                _measure_option(analysis, setting, base, ctx, meter, profile)
            bar.update(1)
    if costs is not None:
        costs.measure(lambda: ctx.run(base), analysis.base)
    analysis.seconds = time.perf_counter() - start
    return analysis


def _measure_option(analysis: Analysis, setting: Setting, base: fx.GraphModule, ctx: PassContext, meter: ErrorMeter,
                    profile: Callable[[fx.GraphModule], tuple[GraphProfile, Any]]) -> None:
    try:
        gm = apply(base, analysis.space.pipeline([setting], lossless=False), ctx)
    except Exception as exc:  # an option a pass cannot apply is dropped, with its reason
        analysis.failed[setting] = f"{type(exc).__name__}: {exc}"
        return
    profiled, outputs = profile(gm)
    analysis.options[setting] = Measured(setting, meter(gm, outputs), profiled)
