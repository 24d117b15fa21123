"""The per-pass report: size, MACs, latency and fidelity of the model before and after every pass."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate

from . import tuning
from .instrument import Instrumentation, PassTimer
from .pass_base import PassResult
from .shapes import ShapeSummary
from .verify import GraphSnapshot, fidelity


@dataclass(frozen=True)
class ReportConfig:
    """What the report measures.

    Latency: every stage is timed interleaved with the input model (:func:`fxcompress.tuning.compare`,
    ``repeats`` rounds, about ``min_run_time`` seconds per model), so the speedup is a ratio measured
    side by side; the median and the inter-quartile range are reported. ``guard``: after the pipeline,
    warn (one line) when the result is measurably slower than the input, naming the passes responsible.
    """

    latency: bool = True
    warmup: int = 2
    repeats: int = 7
    min_run_time: float = 0.3
    guard: bool = True


def report_config(report: ReportConfig | bool) -> ReportConfig:
    """``optimize(report=...)``: a ``ReportConfig`` as given; ``True`` measures latency unless the
    environment says ``FXCOMPRESS_LATENCY=0`` (test suites and CI runs that only need the other columns)."""
    if isinstance(report, ReportConfig):
        return report
    return ReportConfig(latency=bool(report) and os.environ.get("FXCOMPRESS_LATENCY", "1") != "0")


def count_flops(model: torch.nn.Module, inputs: Any) -> int:
    """FLOPs of one forward on ``inputs`` (an :class:`~fxcompress.inputs.Inputs`, e.g. a ``PassContext``),
    by ``torch.utils.flop_counter`` (custom ops register their formulas)."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: only when measuring

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        inputs.run(model)
    return int(counter.get_total_flops())


def count_macs(model: torch.nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of one forward on ``inputs``: FLOPs / 2."""
    return count_flops(model, inputs) // 2


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def latency_vs_baseline(model: torch.nn.Module, baseline: torch.nn.Module, ctx: Any, config: ReportConfig) -> tuple[tuple, tuple]:
    """(model, baseline) :class:`~fxcompress.tuning.Timing` of one forward, measured interleaved."""
    device = next((t.device for t in ctx.tensors()), torch.device("cpu"))
    timings = tuning.compare({"model": lambda: ctx.run(model), "baseline": lambda: ctx.run(baseline)}, device,
                             config.min_run_time, config.repeats)
    return timings["model"], timings["baseline"]


def call_node_count(model: torch.nn.Module) -> int:
    graph = getattr(model, "graph", None)
    return sum(1 for n in graph.nodes if n.op in ("call_function", "call_method")) if graph is not None else 0


@dataclass
class Report:
    """Rows (one for the input model, one per pass), the passes' own results, and per-layer details."""

    rows: list[dict] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    machine: str = ""
    latency_verdict: str = ""
    shapes: Any = None  # fxcompress.shapes.ShapeSummary: dynamic dims, why the others are static

    COLUMNS = (
        ("stage", "stage"), ("pass_time_s", "pass s"), ("params", "params"), ("macs", "MACs"),
        ("weight_bytes", "weight MB"), ("latency_ms", "latency ms"), ("latency_iqr_ms", "IQR ms"), ("speedup", "speedup"),
        ("max_abs_err", "max abs err"), ("cosine", "cosine"), ("nodes", "nodes"), ("changes", "changes"),
    )

    def table(self) -> str:
        body = [[_fmt(key, row.get(key)) for key, _ in self.COLUMNS] for row in self.rows]
        return tabulate(body, headers=[title for _, title in self.COLUMNS], tablefmt="github")

    def details_tables(self) -> str:
        parts = []
        for stage, result in self.results.items():
            if result.details:
                parts.append(f"\n{stage}: per-layer\n" + tabulate(result.details, headers="keys", tablefmt="github", floatfmt=".4g"))
        return "\n".join(parts)

    def skipped(self) -> list[tuple[str, str, str]]:
        return [(stage, target, reason) for stage, r in self.results.items() for target, reason in r.skipped]

    def skipped_summary(self) -> list[str]:
        """One line per (stage, reason): a reason repeated over layers (up to its numbers) is printed once,
        with the count and the first layers."""
        grouped: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for stage, target, reason in self.skipped():
            grouped.setdefault((stage, re.sub(r"\d+", "#", reason)), []).append((target, reason))
        lines = []
        for (stage, _), items in grouped.items():
            targets = [t for t, _ in items]
            if len(items) == 1:
                lines.append(f"  [{stage}] {targets[0]}: {items[0][1]}")
                continue
            example = "" if len({r for _, r in items}) == 1 else "e.g. "
            shown = ", ".join(targets[:3]) + (", ..." if len(targets) > 3 else "")
            lines.append(f"  [{stage}] {len(items)} × {example}{items[0][1]} ({shown})")
        return lines

    def __str__(self) -> str:
        header = f"machine: {self.machine}\n" if self.machine else ""
        verdict = f"\n{self.latency_verdict}\n" if self.latency_verdict else ""
        text = header + self.table() + verdict + self.details_tables()
        skipped = self.skipped_summary()
        if skipped:
            text += "\n\nskipped:\n" + "\n".join(skipped)
        if self.shapes is not None:
            text += "\n\ninput shapes:\n" + "\n".join(f"  {line}" for line in self.shapes.lines())
        return text

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "latency_verdict": self.latency_verdict,
            "rows": self.rows,
            "passes": {
                stage: {"rewritten": r.rewritten, "skipped": [list(s) for s in r.skipped], "details": r.details}
                for stage, r in self.results.items()
            },
            "shapes": self.shapes.to_dict() if self.shapes is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The inverse of :meth:`to_dict` (what :func:`fxcompress.load` gives back as ``.report``)."""
        results = {
            stage: PassResult(bool(r["rewritten"]), list(r["rewritten"]), [tuple(s) for s in r["skipped"]], list(r["details"]))
            for stage, r in data.get("passes", {}).items()
        }
        shapes = ShapeSummary.from_dict(data["shapes"]) if data.get("shapes") else None
        return cls(rows=list(data.get("rows", [])), results=results, shapes=shapes)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "weight_bytes":
        return f"{value / 2**20:.2f}"
    if key in ("params", "macs"):
        return f"{value / 1e6:.2f}M" if value >= 1e5 else str(value)
    if key == "speedup":
        return f"{value:.2f}x" if isinstance(value, float) else str(value)
    if key in ("pass_time_s", "latency_ms", "latency_iqr_ms"):
        return f"{value:.3f}"
    if key == "max_abs_err":
        return f"{value:.2e}"
    if key == "cosine":
        return f"{value:.6f}"
    return str(value)


class ReportBuilder(Instrumentation):
    """Measures the model at the start and after every verified pass; fills a :class:`Report`."""

    def __init__(self, reference_outputs: Any, config: ReportConfig = ReportConfig(), baseline: torch.nn.Module | None = None):
        """``baseline``: the model every stage is timed against (the user's input model; by default a
        copy of the captured graph before the first pass)."""
        self.reference = reference_outputs
        self.config = config
        self.timer = PassTimer()
        self.report = Report()
        self._ctx = None
        self._baseline = baseline

    def _latency_columns(self, gm: torch.nn.Module) -> dict:
        if not self.config.latency:
            return {"latency_ms": None, "latency_iqr_ms": None, "speedup": None}
        model, baseline = latency_vs_baseline(gm, self._baseline, self._ctx, self.config)
        measurable = tuning.speedup_is_measurable(baseline, model)
        return {
            "latency_ms": model.median_ms, "latency_iqr_ms": model.iqr_ms,
            "input_latency_ms": baseline.median_ms, "input_latency_iqr_ms": baseline.iqr_ms,
            "speedup": baseline.median_ms / model.median_ms if measurable else "no measurable change",
        }

    def _measure(self, stage: str, gm: torch.nn.Module, outputs: Any) -> dict:
        flops = count_flops(gm, self._ctx)
        error = fidelity(self.reference, outputs)
        return {
            "stage": stage,
            "params": parameter_count(gm),
            "macs": flops // 2,
            "flops": flops,
            "weight_bytes": weight_bytes(gm),
            **self._latency_columns(gm),
            "max_abs_err": error.max_abs_err,
            "cosine": error.cosine,
            "nodes": call_node_count(gm),
        }

    def on_start(self, gm, ctx, outputs):
        self._ctx = ctx
        if self.config.latency:
            self.report.machine = tuning.device_description(next((t.device for t in ctx.tensors()), torch.device("cpu")))
            if self._baseline is None:  # the graph before the passes, sharing its weights (passes replace them)
                self._baseline = GraphSnapshot.of(gm).module
        self.report.rows.append({**self._measure("input", gm, outputs), "pass_time_s": None, "changes": None})

    def before_pass(self, index, pass_, gm):
        self.timer.before_pass(index, pass_, gm)

    def after_run(self, index, pass_, gm, result):
        self.timer.after_run(index, pass_, gm, result)

    def add_stage(self, stage: str, gm: torch.nn.Module, outputs: Any, seconds: float, changes: str) -> None:
        """A row for work done outside the pass pipeline (e.g. distillation after the passes)."""
        self.report.rows.append({**self._measure(stage, gm, outputs), "pass_time_s": seconds, "changes": changes})

    def after_pass(self, index, pass_, gm, result, outputs):
        stage = pass_.name if pass_.name not in self.report.results else f"{pass_.name}#{index}"
        self.report.results[stage] = result
        row = self._measure(stage, gm, outputs)
        row.update(pass_time_s=self.timer.seconds.get(index), changes=result.summary())
        self.report.rows.append(row)


def slower_passes(report: Report) -> list[str]:
    """The stages after which the model got measurably slower than after the stage before."""
    slower = []
    for before, after in zip(report.rows, report.rows[1:]):
        if before.get("latency_ms") is None or after.get("latency_ms") is None:
            continue
        # each row is a ratio to the same input model, measured interleaved: compare the ratios
        ratio_before = before["latency_ms"] / before["input_latency_ms"]
        ratio_after = after["latency_ms"] / after["input_latency_ms"]
        spread = max(before["latency_iqr_ms"] / before["latency_ms"], after["latency_iqr_ms"] / after["latency_ms"])
        if ratio_after - ratio_before > spread * ratio_before:
            slower.append(after["stage"])
    return slower


def latency_guard(report: Report, size_only: tuple[str, ...] = ()) -> str:
    """After the pipeline: one line (a warning) when the result is measurably slower than the input.

    Passes named in ``size_only`` (their purpose is size, e.g. ``Int8(allow_slower=True)``) are
    reported, not warned about. The line also goes into ``report.latency_verdict``.
    """
    final = report.rows[-1] if report.rows else {}
    if final.get("latency_ms") is None or len(report.rows) < 2:
        return ""
    if final["speedup"] == "no measurable change" or final["speedup"] >= 1.0:
        report.latency_verdict = (f"end to end: {final['input_latency_ms']:.3g} -> {final['latency_ms']:.3g} ms, "
                                  + ("no measurable change" if isinstance(final["speedup"], str) else f"{final['speedup']:.2f}x"))
        return ""
    responsible = slower_passes(report) or [final["stage"]]
    accepted = [p for p in responsible if p.split("#")[0] in size_only]
    line = (f"fxcompress: the optimized model is slower than the input ({final['input_latency_ms']:.3g} ms -> "
            f"{final['latency_ms']:.3g} ms, {final['speedup']:.2f}x); slower after: {', '.join(responsible)}")
    if accepted and len(accepted) == len(responsible):
        report.latency_verdict = line + " (accepted: these passes were asked for size, allow_slower=True)"
        return ""
    report.latency_verdict = line
    warnings.warn(line, RuntimeWarning, stacklevel=3)
    return line
