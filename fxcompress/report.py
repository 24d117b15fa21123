"""The per-pass report: size, MACs, latency and fidelity of the model before and after every pass."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from .instrument import Instrumentation, PassTimer
from .verify import fidelity


@dataclass(frozen=True)
class ReportConfig:
    """What the report measures. Latency is the median of ``repeats`` runs after ``warmup`` runs."""

    latency: bool = True
    warmup: int = 2
    repeats: int = 10


def count_flops(model: torch.nn.Module, ctx: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ctx.run(model)
    return int(counter.get_total_flops())


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def median_latency_ms(model: torch.nn.Module, ctx: Any, config: ReportConfig) -> float:
    """Median wall time of one forward; on CUDA ``triton.testing.do_bench`` (L2 flush, CUDA events)."""
    device = next((t.device for t in ctx.tensors()), torch.device("cpu"))
    with torch.no_grad():
        if device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(lambda: ctx.run(model), warmup=25, rep=100, return_mode="median"))
        for _ in range(config.warmup):
            ctx.run(model)
        times = []
        for _ in range(config.repeats):
            start = time.perf_counter()
            ctx.run(model)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def call_node_count(model: torch.nn.Module) -> int:
    graph = getattr(model, "graph", None)
    return sum(1 for n in graph.nodes if n.op in ("call_function", "call_method")) if graph is not None else 0


@dataclass
class Report:
    """Rows (one for the input model, one per pass), the passes' own results, and per-layer details."""

    rows: list[dict] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    shapes: Any = None  # fxcompress.shapes.ShapeSummary: dynamic dims, why the others are static

    COLUMNS = (
        ("stage", "stage"), ("pass_time_s", "pass s"), ("params", "params"), ("macs", "MACs"),
        ("weight_bytes", "weight MB"), ("latency_ms", "latency ms"), ("speedup", "speedup"),
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

    def __str__(self) -> str:
        text = self.table() + self.details_tables()
        skipped = self.skipped()
        if skipped:
            text += "\n\nskipped:\n" + "\n".join(f"  [{s}] {t}: {r}" for s, t, r in skipped)
        if self.shapes is not None:
            text += "\n\ninput shapes:\n" + "\n".join(f"  {line}" for line in self.shapes.lines())
        return text

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "passes": {
                stage: {"rewritten": r.rewritten, "skipped": [list(s) for s in r.skipped], "details": r.details}
                for stage, r in self.results.items()
            },
            "shapes": self.shapes.to_dict() if self.shapes is not None else None,
        }

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
        return f"{value:.2f}x"
    if key in ("pass_time_s", "latency_ms"):
        return f"{value:.3f}"
    if key == "max_abs_err":
        return f"{value:.2e}"
    if key == "cosine":
        return f"{value:.6f}"
    return str(value)


class ReportBuilder(Instrumentation):
    """Measures the model at the start and after every verified pass; fills a :class:`Report`."""

    def __init__(self, reference_outputs: Any, config: ReportConfig = ReportConfig()):
        self.reference = reference_outputs
        self.config = config
        self.timer = PassTimer()
        self.report = Report()
        self._ctx = None
        self._base_latency: float | None = None

    def _measure(self, stage: str, gm: torch.nn.Module, outputs: Any) -> dict:
        flops = count_flops(gm, self._ctx)
        latency = median_latency_ms(gm, self._ctx, self.config) if self.config.latency else None
        if self._base_latency is None:
            self._base_latency = latency
        error = fidelity(self.reference, outputs)
        return {
            "stage": stage,
            "params": parameter_count(gm),
            "macs": flops // 2,
            "flops": flops,
            "weight_bytes": weight_bytes(gm),
            "latency_ms": latency,
            "speedup": self._base_latency / latency if latency and self._base_latency else None,
            "max_abs_err": error.max_abs_err,
            "cosine": error.cosine,
            "nodes": call_node_count(gm),
        }

    def on_start(self, gm, ctx, outputs):
        self._ctx = ctx
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
