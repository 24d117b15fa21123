"""``optimize(model, x, target=Target(...))``: sensitivity, cost model, allocation, end-to-end verification.

1. Capture; run the lossless passes: the *base* graph every option is measured on.
2. :func:`find_space` lists the sites; :func:`analyze` applies every option alone (error + profile).
3. The cost model times the nodes of all option graphs; its correction is the base graph's measured
   end-to-end latency over its node sum.
4. :class:`Front` (exact multiple-choice knapsack over the measured savings) proposes, for the budget
   and for tighter ones (a margin for what the additive model misses), the least-error allocations.
5. Each proposal and each single-pass baseline is built by the pass manager and measured end to end,
   interleaved with the input model (the chosen one is then built again, verified, by ``optimize``). The least-error candidate that meets the target wins; if
   none does after one re-solve with the measured/predicted ratio, the best reachable one is returned
   with a message.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from typing import Any

import torch
import torch.fx as fx

from ..capture import capture, check_model_and_inputs, eval_copy
from ..inputs import Inputs
from ..errors import FxCompressWarning
from ..pass_base import PassContext
from ..registry import make_pass
from ..quiet import quiet
from ..statistics import check_calibration
from ..training import Batch
from .allocate import Choice, Front
from .cost_model import Clock, CostModel, GraphProfile, measured_clock, static_costs
from .result import Candidate, SearchResult
from .sensitivity import Analysis, ErrorMeter, analyze, cached_analysis, content_digest
from .space import LOSSLESS, Setting, Space, apply, find_space
from .target import Target

MARGINS = (1.0, 0.9, 0.8, 0.7, 0.6)


class Search:
    """One search: the captured graphs, the measurements, and the candidates verified so far."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any, target: Target, progress: bool | None = None,
                 clock: Clock | None = None):
        self.target, self.progress, self.clock = target, progress, clock
        inputs = Inputs.of(example_inputs)
        check_model_and_inputs(model, inputs)
        self.model = eval_copy(model)
        self.input_gm = capture(self.model, inputs)
        calibration = check_calibration(target.calibration)
        self.ctx = PassContext(inputs.args, inputs.kwargs, calibration=calibration)
        self.base = apply(self.input_gm, [make_pass(p) for p in LOSSLESS], self.ctx)
        self.device = next((t.device for t in self.ctx.tensors()), torch.device("cpu"))
        batches = [Batch.of(b) for b in calibration] if calibration is not None else [Batch(inputs.args, inputs.kwargs, None)]
        self.meter = ErrorMeter(self.base, batches, target.metric)
        self.timed = target.resource in (None, "latency")
        key = content_digest(self.base, batches, target.passes, target.prune_ratios, target.ranks, repr(target.metric),
                             repr(clock), self.timed)
        self.costs, self.analysis = cached_analysis(key, self._analyze)
        self.candidates: list[Candidate] = []
        self._models: dict[str, fx.GraphModule] = {}

    def _analyze(self) -> tuple[CostModel, Analysis]:
        t = self.target
        costs = CostModel(self.device, self.clock)
        space = find_space(self.base, self.ctx, t.passes, t.prune_ratios, t.ranks)
        return costs, analyze(self.base, self.input_gm, self.ctx, space, self.meter, costs if self.timed else None,
                              t.time_budget_s, self.progress)

    # -- quantities -----------------------------------------------------------------------------------

    def _quantity(self, profile) -> float:
        resource = self.target.resource or "latency"
        if resource == "latency":
            return self.costs.predict_ms(profile)
        return float(profile.weight_bytes if resource == "size" else profile.macs)

    def _front(self) -> Front:
        base = self._quantity(self.analysis.base)
        sites = []
        for site in self.analysis.space.sites:
            choices = []
            for setting in site.options:
                measured = self.analysis.options.get(setting)
                ok = measured is not None and measured.error == measured.error
                choices.append(Choice(base - self._quantity(measured.profile), measured.error) if ok else Choice(0.0, float("inf")))
            sites.append(choices)
        return Front(sites)

    def _settings(self, picks: tuple[int, ...]) -> list[Setting]:
        return [site.options[j] for site, j in zip(self.analysis.space.sites, picks) if j >= 0]

    # -- end-to-end measurement -----------------------------------------------------------------------

    def _add(self, name: str, source: str, passes: list, predicted: float | None = None) -> None:
        """Build a pipeline on the input graph and measure it (error, size, MACs; latency in :meth:`_time_all`).
        Built pipelines are kept with the analysis: another target on the same model reuses them."""
        if any(c.name == name for c in self.candidates):
            return
        configs = [p.config() for p in passes]
        key = json.dumps(configs, sort_keys=True, default=str)
        if key not in self.analysis.built:
            gm = apply(self.input_gm, passes, self.ctx)
            profile = static_costs(gm, self.ctx, GraphProfile([]))
            error = self.meter(gm) if source != "input" else 0.0
            self.analysis.built[key] = (gm, error, profile.weight_bytes / self.input_size, profile.macs / self.input_macs)
        gm, error, size, macs = self.analysis.built[key]
        self._models[name] = gm
        self.candidates.append(Candidate(name, source, configs, error, size=size, macs=macs, predicted=predicted))

    def _time_all(self) -> None:
        """Latency of every candidate (and the input model) as a fraction of the input, interleaved."""
        if self.target.resource not in (None, "latency"):
            return
        fns = {name: (lambda gm=gm: self.ctx.run(gm)) for name, gm in self._models.items()}
        timings = (self.clock or measured_clock(self.device, min_run_time=0.2, warmup=1))(fns)
        for c in self.candidates:
            c.latency = timings[c.name].median_ms / timings["input"].median_ms

    def _judge(self) -> None:
        """A candidate meets a budget when its measured quantity is within it (latency: plus ``tolerance``);
        with only ``max_error``, when its error is within that."""
        t = self.target
        slack = 1 + (t.tolerance if t.resource == "latency" else 0.0)
        for c in self.candidates:
            c.meets = (getattr(c, t.resource) <= t.budget * slack + 1e-12) if t.resource else c.error <= t.max_error

    # -- the search ----------------------------------------------------------------------------------

    def run(self) -> SearchResult:
        start = time.perf_counter()
        t = self.target
        input_profile = static_costs(self.input_gm, self.ctx, GraphProfile([]))
        self.input_size, self.input_macs = input_profile.weight_bytes, input_profile.macs
        self._add("input", "input", [])
        if t.baselines:
            self._add_baselines()
        front = self._front()
        reference = self._reference_quantity()
        scale = 1.0
        for _ in range(2):
            self._propose(front, reference, scale)
            self._time_all()
            self._judge()
            if any(c.meets and c.source == "search" for c in self.candidates) or t.resource is None:
                break
            scale = self._rescale(scale)
        chosen, message = self._choose()
        base = self._quantity(self.analysis.base)
        front_points = [((base - saving) / reference, error) for saving, error in front.points()]
        stats = {"sites": len(self.analysis.space.sites), "options measured": len(self.analysis.options),
                 "sensitivity s": self.analysis.seconds, "search s": time.perf_counter() - start}
        if self.timed:
            stats["latency correction"] = self.costs.correction
        if self.analysis.unmeasured:
            stats["options not measured (time_budget_s)"] = len(self.analysis.unmeasured)
        return SearchResult(t.describe(), t.resource, t.budget, chosen, self.candidates, front_points, message, stats)

    def _reference_quantity(self) -> float:
        """The input model's quantity in the units of the front (latency: as the cost model predicts it)."""
        resource = self.target.resource or "latency"
        return {"size": self.input_size, "macs": self.input_macs}.get(resource) or self._quantity(self.analysis.input)

    def _add_baselines(self) -> None:
        lossless = [make_pass(p) for p in LOSSLESS]
        t = self.target
        singles = []
        if "prune_channels" in t.passes:
            singles += [(f"prune_channels ratio={r:g}", make_pass("prune_channels", ratio=r)) for r in t.prune_ratios]
        if "low_rank" in t.passes:
            singles += [(f"low_rank rank={r:g}", make_pass("low_rank", rank=r)) for r in t.ranks]
        if "int8" in t.passes:
            singles.append(("int8", make_pass("int8")))
        for name, pass_ in singles:
            try:
                self._add(name, "baseline", [*lossless, pass_])
            except Exception as exc:  # a baseline that fails is reported, the search goes on
                warnings.warn(f"fxcompress search: baseline {name} failed ({type(exc).__name__}: {exc})", FxCompressWarning, stacklevel=2)

    def _propose(self, front: Front, reference: float, scale: float) -> None:
        """Build the least-error allocations for the budget and tighter ones (at most ``verify_candidates``)."""
        t = self.target
        base = self._quantity(self.analysis.base)
        proposals = []
        for margin in MARGINS:
            if t.resource is not None:
                allocation = front.allocation(base - t.budget * reference * margin * scale)
                if allocation is None:
                    allocation = front.allocation(front.max_saving * 0.999) or front.allocation(0.0)
            else:
                allocation = front.cheapest_within(t.max_error * margin)
            if allocation.picks not in [p.picks for p in proposals]:
                proposals.append(allocation)
            if len(proposals) >= t.verify_candidates:
                break
        for allocation in proposals:
            settings = self._settings(allocation.picks)
            name = "auto: " + (", ".join(f"{s.site} {s.label()}" for s in settings) or "lossless only")
            predicted = (base - allocation.saving) / reference
            self._add(name if len(name) < 90 else f"auto #{len(self.candidates)} ({len(settings)} settings)", "search",
                      self.analysis.space.pipeline(settings), predicted)

    def _rescale(self, scale: float) -> float:
        """Tighten the budget by how much the measurement exceeded the prediction (median over proposals)."""
        resource = self.target.resource
        ratios = [getattr(c, resource) / c.predicted for c in self.candidates
                  if c.source == "search" and c.predicted and getattr(c, resource)]
        return scale / max(statistics.median(ratios), 1.05) if ratios else scale * 0.8

    def _choose(self) -> tuple[Candidate, str]:
        t = self.target
        measured = [c for c in self.candidates if c.source != "input"] or self.candidates
        meeting = [c for c in measured if c.meets]
        if t.resource is None:
            within = [c for c in measured if c.error <= t.max_error]
            if within:
                return min(within, key=lambda c: (c.latency or 0.0, c.error)), ""
            best = min(measured, key=lambda c: c.error)
            return best, (f"no pipeline found within max_error={t.max_error:g}; the least error measured is "
                          f"{best.error:.3g} ({best.name})")
        if meeting:
            best = min(meeting, key=lambda c: c.error)
            if t.max_error is not None and best.error > t.max_error:
                return best, (f"{t.resource}<={t.budget:g} is met, but with error {best.error:.3g} > max_error={t.max_error:g}: "
                              f"no measured pipeline meets both")
            return best, ""
        best = min(measured, key=lambda c: (getattr(c, t.resource), c.error))
        return best, (f"target {t.resource}<={t.budget:g} of the input model is not reachable with "
                      f"{', '.join(t.passes)} in this search space: the best reachable point measures "
                      f"{t.resource} {getattr(best, t.resource):.3g} with error {best.error:.3g} ({best.name})")


@quiet
def search(model: torch.nn.Module, example_inputs: Any, target: Target, progress: bool | None = None,
           clock: Clock | None = None) -> SearchResult:
    """Run the search; the result's :attr:`SearchResult.pipeline` builds the chosen model with ``passes=``.
    ``clock`` replaces the machine's timer (tests: a deterministic one)."""
    result = Search(model, example_inputs, target, progress, clock).run()
    if result.message:
        warnings.warn(f"fxcompress: {result.message}", FxCompressWarning, stacklevel=3)
    return result
