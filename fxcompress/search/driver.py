"""``optimize(model, x, target=Target(...))``: sensitivity, cost model, allocation, correction rounds.

1. Capture; run the lossless passes: the *base* graph every option is measured on (both cached per
   model, :mod:`.cache`: several targets share one capture and one analysis).
2. :func:`find_space` lists the sites; :func:`analyze` applies every option alone (error + profile).
3. The cost model times the nodes of all option graphs; its correction is the base graph's measured
   end-to-end latency over its node sum.
4. :class:`~.compose.ComposedFront` gives the least-error allocation for any required saving: options
   compose per base node (kept fractions and speed ratios multiply on the nodes they act on), solved by
   the multiple-choice knapsack re-linearized at its own answers.
5. Correction rounds: the allocation for the budget is built by the pass manager (unverified: the
   chosen one is built again, verified, by ``optimize``) and measured end to end, interleaved with
   the input model. The cost model's error is taken as a factor on the predicted fraction: a pipeline
   predicted at ``p`` and measured at ``m`` makes the next allocation aim at ``budget · p / m``; once
   one round measured under the budget and one over, the aim interpolates between them (:func:`_next_aim`).
   Rounds stop when a measurement lands within ``tolerance`` of the budget, when the allocation would
   repeat, or after ``verify_candidates`` rounds. The single-pass baselines are measured alike. The
   least-error candidate that meets the target wins; if none does, the closest one is returned with
   a message saying how close it got and why.
6. Refinement rounds (:mod:`.refine`): the least-error allocation one step per site from the best
   candidate that meets (a baseline or a round's), within its measured slack; built and measured, so
   the returned error is never above that of a single pass that meets the budget on the search's
   own measurement.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import torch
import torch.fx as fx

from ..capture import capture, check_model_and_inputs
from ..inputs import Inputs
from ..errors import FxCompressWarning
from ..pass_base import PassContext
from ..registry import make_pass
from ..quiet import quiet
from ..statistics import check_calibration
from ..training import Batch
from .allocate import Allocation
from .cache import ANALYSES, CAPTURES, content_digest, model_digest
from .compose import ComposedFront, composed_front
from .cost_model import Clock, CostModel, GraphProfile, measured_clock, static_costs
from .result import Candidate, Round, SearchResult
from .refine import refine
from .sensitivity import Analysis, Built, ErrorMeter, analyze
from .space import LOSSLESS, Setting, apply, find_space
from .target import Target

ERROR_MARGINS = (1.0, 0.9, 0.8, 0.7, 0.6)  # only max_error: the error allowed to the allocator, tightened
CONFIRMED = 3  # latency: the least-error candidates meeting the budget that are timed a second time


class Search:
    """One search: the captured graphs, the measurements, and the candidates verified so far."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any, target: Target, progress: bool | None = None,
                 clock: Clock | None = None):
        self.target, self.progress, self.clock = target, progress, clock
        inputs = Inputs.of(example_inputs)
        check_model_and_inputs(model, inputs)
        calibration = check_calibration(target.calibration)
        self.ctx = PassContext(inputs.args, inputs.kwargs, calibration=calibration)
        self.input_gm, self.base = CAPTURES.get(model_digest(model, inputs.args, inputs.kwargs),
                                                lambda: self._capture(model, inputs))
        self.device = next((t.device for t in self.ctx.tensors()), torch.device("cpu"))
        batches = [Batch.of(b) for b in calibration] if calibration is not None else [Batch(inputs.args, inputs.kwargs, None)]
        self.timed = target.resource in (None, "latency")
        key = content_digest(self.base, batches, target.passes, target.prune_ratios, target.ranks, repr(target.metric),
                             repr(clock), target.resource)
        self.meter, self.costs, self.analysis = ANALYSES.get(key, lambda: self._analyze(batches, Batch(inputs.args, inputs.kwargs, None)))
        self.candidates: list[Candidate] = []
        self.rounds: list[Round] = []
        self._models: dict[str, fx.GraphModule] = {}
        self._picks: dict[str, tuple[int, ...]] = {}  # candidate name -> its option per site (for refinement)

    def _capture(self, model: torch.nn.Module, inputs: Inputs) -> tuple[fx.GraphModule, fx.GraphModule]:
        input_gm = capture(model, inputs)
        return input_gm, apply(input_gm, [make_pass(p) for p in LOSSLESS], self.ctx)

    def _analyze(self, batches: list[Batch], example: Batch) -> tuple[ErrorMeter, CostModel, Analysis]:
        t = self.target
        meter = ErrorMeter(self.base, batches, t.metric, example)
        costs = CostModel(self.device, self.clock)
        space = find_space(self.base, self.ctx, t.passes, t.prune_ratios, t.ranks)
        analysis = analyze(self.base, self.input_gm, self.ctx, space, meter, costs if self.timed else None,
                           t.resource == "macs", t.time_budget_s, self.progress)
        return meter, costs, analysis

    # -- quantities -----------------------------------------------------------------------------------

    def _quantity(self, profile) -> float:
        resource = self.target.resource or "latency"
        if resource == "latency":
            return self.costs.predict_ms(profile)
        return float(profile.weight_bytes if resource == "size" else profile.macs)

    def _front(self) -> ComposedFront:
        self.front = composed_front(self.analysis, self._quantity, self.costs if self.timed else None)
        return self.front

    def _settings(self, picks: tuple[int, ...]) -> list[Setting]:
        return [site.options[j] for site, j in zip(self.analysis.space.sites, picks) if j >= 0]

    # -- end-to-end measurement -----------------------------------------------------------------------

    def _add(self, name: str, source: str, passes: list, predicted: float | None = None) -> Candidate:
        """Build a pipeline on the input graph and measure error, size and MACs (latency: :meth:`_measure`).
        Built pipelines are kept with the analysis: another target on the same model reuses them."""
        configs = [p.config() for p in passes]
        existing = next((c for c in self.candidates if c.pipeline == configs), None)
        if existing is not None:
            existing.predicted = existing.predicted if existing.predicted is not None else predicted
            return existing
        key = json.dumps(configs, sort_keys=True, default=str)
        if key not in self.analysis.built:
            gm = apply(self.input_gm, passes, self.ctx)
            profile = static_costs(gm, self.ctx, GraphProfile([]))
            error = self.meter(gm) if source != "input" else 0.0
            self.analysis.built[key] = Built(gm, error, profile.weight_bytes / self.input_size, profile.macs / self.input_macs,
                                             1.0 if source == "input" else None)
        built = self.analysis.built[key]
        self._models[name] = built.gm
        candidate = Candidate(name, source, configs, built.error, built.latency, built.size, built.macs, predicted)
        self.candidates.append(candidate)
        return candidate

    def _measure(self) -> None:
        """Latency of the candidates not timed yet, as a fraction of the input model timed in the same,
        interleaved run (a fraction measured once is kept with the built pipeline)."""
        if self.target.resource not in (None, "latency"):
            return
        new = [c for c in self.candidates if c.latency is None]
        if not new:
            return
        fns = {name: (lambda gm=self._models[name]: self.ctx.run(gm)) for name in ["input", *(c.name for c in new)]}
        timings = (self.clock or measured_clock(self.device, min_run_time=0.2, rounds=7))(fns)
        for c in new:
            c.latency = timings[c.name].median_ms / timings["input"].median_ms
            self.analysis.built[json.dumps(c.pipeline, sort_keys=True, default=str)].latency = c.latency

    def _confirm(self) -> None:
        """Time the :data:`CONFIRMED` least-error candidates that meet a second time, side by side with the
        input model (under load one measurement can land far off: a pipeline measured at 0.09 once and
        0.52 later); each keeps the slower of its two fractions in this search, so a choice never rests on
        one lucky run."""
        confirmed: set[str] = set()
        while True:  # until the CONFIRMED least-error ones that still meet have all been timed twice
            meeting = sorted((c for c in self.candidates if c.meets and c.source != "input"), key=lambda c: c.error)
            todo = [c for c in meeting[:CONFIRMED] if c.name not in confirmed]
            if not todo:
                return
            fns = {name: (lambda gm=self._models[name]: self.ctx.run(gm)) for name in ["input", *(c.name for c in todo)]}
            timings = (self.clock or measured_clock(self.device, min_run_time=0.2, rounds=7))(fns)
            for c in todo:
                c.latency = max(c.latency, timings[c.name].median_ms / timings["input"].median_ms)
                c.meets = self._meets(c)
                confirmed.add(c.name)

    def _meets(self, c: Candidate) -> bool:
        """Within the budget (latency: plus ``tolerance``, timing noise); only ``max_error``: within it."""
        t = self.target
        if t.resource is None:
            return c.error <= t.max_error
        slack = 1 + (t.tolerance if t.resource == "latency" else 0.0)
        return getattr(c, t.resource) <= t.budget * slack + 1e-12

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
        if t.resource is None:
            self._within_error(front, reference)
        else:
            self._correction_rounds(front, reference)
            self._refinement_rounds(reference)
        self._measure()
        for c in self.candidates:
            c.meets = self._meets(c)
        if t.resource == "latency":
            self._confirm()
        chosen, message = self._choose()
        base = self._quantity(self.analysis.base)
        front_points = [((base - saving) / reference, error) for saving, error in front.points()]
        stats = {"sites": len(self.analysis.space.sites), "options measured": len(self.analysis.options),
                 "sensitivity s": self.analysis.seconds, "search s": time.perf_counter() - start}
        if self.timed:
            stats["latency correction"] = self.costs.correction
        if self.analysis.unmeasured:
            stats["options not measured (time_budget_s)"] = len(self.analysis.unmeasured)
        return SearchResult(t.describe(), t.resource, t.budget, chosen, self.candidates, front_points, message, stats,
                            self.rounds)

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
                self._picks[name] = self._baseline_picks(pass_.config())
            except Exception as exc:  # a baseline that fails is reported, the search goes on
                warnings.warn(f"fxcompress search: baseline {name} failed ({type(exc).__name__}: {exc})", FxCompressWarning, stacklevel=2)

    def _baseline_picks(self, config: dict) -> tuple[int, ...]:
        """A single pass as an allocation: the option of each site with the pass's ratio, rank or int8."""
        def matches(s: Setting) -> bool:
            if config["pass"] == "prune_channels":
                return s.kind == "prune" and s.ratio == config["ratio"]
            if config["pass"] == "low_rank":
                return s.kind == "layer" and s.rank == config["rank"] and not s.int8
            return s.kind == "layer" and s.rank is None and s.int8
        return tuple(next((j for j, s in enumerate(site.options) if matches(s)), -1) for site in self.analysis.space.sites)

    def _add_allocation(self, allocation: Allocation, reference: float, predicted: float | None = None) -> Candidate:
        settings = self._settings(allocation.picks)
        name = "auto: " + (", ".join(f"{s.site} {s.label()}" for s in settings) or "lossless only")
        if predicted is None:
            predicted = (self._quantity(self.analysis.base) - allocation.saving) / reference
        name = name if len(name) < 90 else f"auto #{len(self.candidates)} ({len(settings)} settings)"
        candidate = self._add(name, "search", self.analysis.space.pipeline(settings), predicted)
        self._picks.setdefault(candidate.name, allocation.picks)
        return candidate

    def _refinement_rounds(self, reference: float) -> None:
        """:func:`.refine.refine` around the least-error candidate that meets the budget, built and
        measured; a refinement over the budget halves the slack (a timing under load is noisy: its
        overshoot is no measure of the model's error), one that meets becomes the next anchor if it has
        less error. At most ``verify_candidates`` rounds."""
        t, tried, scale = self.target, set(), 1.0
        self._measure()
        for _ in range(t.verify_candidates):
            for c in self.candidates:
                c.meets = self._meets(c)
            meeting = [c for c in self.candidates if c.meets and c.name in self._picks]
            if not meeting:
                return
            anchor = min(meeting, key=lambda c: c.error)
            measured = getattr(anchor, t.resource)
            slack = (t.budget - measured) * reference * scale
            anchor_picks = self._picks[anchor.name]
            picks = refine(self.front.linearized(anchor_picks), anchor_picks, slack)
            if picks is None or picks == anchor_picks or picks in tried:
                return
            tried.add(picks)
            saving = self.front.saving(picks)
            predicted = measured - (saving - self.front.saving(anchor_picks)) / reference
            candidate = self._add_allocation(Allocation(picks, saving, 0.0), reference, predicted)
            self._measure()
            result = getattr(candidate, t.resource)
            self.rounds.append(Round(t.budget, predicted, result, candidate.name, True, anchor.name))
            if result > t.budget * (1 + (t.tolerance if t.resource == "latency" else 0.0)):
                scale /= 2

    def _correction_rounds(self, front: ComposedFront, reference: float) -> None:
        """Allocate for the aim, build, measure, rescale the aim by predicted/measured; see the module doc."""
        t = self.target
        low, high = t.budget * (1 - t.tolerance), t.budget * (1 + (t.tolerance if t.resource == "latency" else 0.0))
        aim, tried = t.budget, []
        for _ in range(t.verify_candidates):
            allocation, reachable = self._allocation(front, reference, aim, tried)
            if allocation is None:
                break
            tried.append(allocation)
            candidate = self._add_allocation(allocation, reference)
            self._measure()
            measured = getattr(candidate, t.resource)
            self.rounds.append(Round(aim, candidate.predicted, measured, candidate.name, reachable))
            if low <= measured <= high or (not reachable and measured > high) or not measured > 0:
                break
            aim = _next_aim(self.rounds, t.budget)

    def _allocation(self, front: ComposedFront, reference: float, aim: float, tried: list[Allocation]) -> tuple[Allocation | None, bool]:
        """The least-error allocation predicted at ``aim`` (``reachable=False``: the largest saving, which
        falls short of it); a repeat of a tried one moves one step tighter when the last one was over the
        budget, and ends the rounds when it was under (nothing new to learn)."""
        required = self._quantity(self.analysis.base) - aim * reference
        allocation = front.allocation(required)
        reachable = allocation is not None
        if allocation is None:
            allocation = front.allocation(front.max_saving * 0.999) or front.allocation(0.0)
        if all(allocation.picks != a.picks for a in tried):
            return allocation, reachable
        if not reachable or any(r.measured <= self.target.budget for r in self.rounds):
            return None, reachable  # under the budget once: a repeat has nothing new between the bracket's ends
        tighter = front.allocation(max(a.saving for a in tried) + front.step)
        if tighter is None or any(tighter.picks == a.picks for a in tried):
            return None, False
        return tighter, True

    def _within_error(self, front: ComposedFront, reference: float) -> None:
        """Only ``max_error``: the largest saving within it, and within tighter fractions of it (errors
        do not add up exactly), at most ``verify_candidates`` pipelines."""
        t = self.target
        proposals: list[Allocation] = []
        for margin in ERROR_MARGINS:
            allocation = front.cheapest_within(t.max_error * margin)
            if allocation.picks not in [p.picks for p in proposals]:
                proposals.append(allocation)
            if len(proposals) >= t.verify_candidates:
                break
        for allocation in proposals:
            self._add_allocation(allocation, reference)

    def _choose(self) -> tuple[Candidate, str]:
        t = self.target
        measured = [c for c in self.candidates if c.source != "input"] or self.candidates
        meeting = [c for c in measured if c.meets]
        if t.resource is None:
            if meeting:
                return min(meeting, key=lambda c: (c.latency or 0.0, c.error)), ""
            best = min(measured, key=lambda c: c.error)
            return best, (f"no pipeline found within max_error={t.max_error:g}; the least error measured is "
                          f"{best.error:.3g} ({best.name})")
        if meeting:
            best = min(meeting, key=lambda c: (c.error, getattr(c, t.resource)))
            if t.max_error is not None and best.error > t.max_error:
                return best, (f"{t.resource}<={t.budget:g} is met, but with error {best.error:.3g} > max_error={t.max_error:g}: "
                              f"no measured pipeline meets both")
            return best, ""
        best = min(measured, key=lambda c: (getattr(c, t.resource), c.error))
        return best, self._not_met_message(best)

    def _not_met_message(self, best: Candidate) -> str:
        """Why no candidate meets the budget: the space cannot reach it, or the rounds ran out."""
        t = self.target
        closest = f"{t.resource} {getattr(best, t.resource):.3g} with error {best.error:.3g} ({best.name})"
        if not self.rounds or not self.rounds[-1].reachable:
            return (f"target {t.resource}<={t.budget:g} of the input model is not reachable with {', '.join(t.passes)} "
                    f"in this search space: the best reachable point measures {closest}")
        rounds = "; ".join(f"{r.predicted:.3g} -> {r.measured:.3g}" for r in self.rounds)
        return (f"target {t.resource}<={t.budget:g} not met after {len(self.rounds)} correction round(s): the closest "
                f"measures {closest}; predicted -> measured per round: {rounds} (the cost model composes the options' "
                f"measured effects per node and misses what rewrites change only together, and timing noise; more rounds: Target(verify_candidates=...))")


MAX_AIM_STEP = 2.0  # one round moves the aim by at most this factor (a noisy measurement is one sample)


def _next_aim(rounds: list[Round], budget: float) -> float:
    """The predicted fraction the next allocation aims at, taking measured latency as increasing in the
    prediction. Once one round measured under the budget and one over, the aim interpolates linearly
    between the two closest (a bracket that only shrinks: the rounds converge). Before that, the last
    round's measured/predicted factor is taken as constant: ``budget · predicted / measured``; a
    prediction <= 0 (the cost model broke down) scales the aim
    itself instead; the step is bounded by :data:`MAX_AIM_STEP`. Never above 1 (that saves nothing)."""
    under = [r for r in rounds if r.predicted > 0 and r.measured <= budget]
    over = [r for r in rounds if r.predicted > 0 and r.measured > budget]
    if under and over:
        below, above = max(under, key=lambda r: r.predicted), min(over, key=lambda r: r.predicted)
        if below.predicted < above.predicted:  # noise can invert the order; then no bracket
            weight = (budget - below.measured) / (above.measured - below.measured)
            return min(below.predicted + weight * (above.predicted - below.predicted), 1.0)
    last = rounds[-1]
    proposed = budget * last.predicted / last.measured if last.predicted > 0 else last.aim * budget / last.measured
    return min(max(proposed, last.aim / MAX_AIM_STEP), last.aim * MAX_AIM_STEP, 1.0)


@quiet
def search(model: torch.nn.Module, example_inputs: Any, target: Target, progress: bool | None = None,
           clock: Clock | None = None) -> SearchResult:
    """Run the search; the result's :attr:`SearchResult.pipeline` builds the chosen model with ``passes=``.
    ``clock`` replaces the machine's timer (tests: a deterministic one)."""
    result = Search(model, example_inputs, target, progress, clock).run()
    if result.message:
        warnings.warn(f"fxcompress: {result.message}", FxCompressWarning, stacklevel=3)
    return result
