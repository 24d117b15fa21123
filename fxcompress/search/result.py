"""What a search returns besides the model: the candidates it measured, the predicted front, the choice.

The chosen pipeline is plain data (pass configurations), printable, saveable as JSON and replayable:
``fxcompress.optimize(model, x, passes=result.pipeline)`` (or ``passes=load_pipeline(path)``) builds
the same model. The Pareto report is a table (tabulate) and, with matplotlib installed
(``pip install "fxcompress[plot]"``), a plot of error against the budgeted resource.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

from ..errors import InvalidInputError
from ..pass_base import Pass
from ..registry import make_pass


@dataclass
class Candidate:
    """One pipeline built and measured end to end. Fractions are of the input model."""

    name: str
    source: str  # "search" (an allocation), "baseline" (a single lossy pass) or "input"
    pipeline: list[dict]
    error: float
    latency: float | None = None
    size: float | None = None
    macs: float | None = None
    predicted: float | None = None  # the budgeted resource as the cost model predicted it
    meets: bool = False


@dataclass(frozen=True)
class Round:
    """One correction round: the fraction the allocation aimed at, the cost model's prediction for the
    allocation, its measurement end to end (fractions of the input model), and whether the search space
    reaches the aim at all (``reachable=False``: the largest saving was built)."""

    aim: float
    predicted: float
    measured: float
    candidate: str
    reachable: bool = True
    anchor: str | None = None  # a refinement round: the measured candidate it refined (:mod:`.refine`)


@dataclass
class SearchResult:
    """The search's report: target, every measured candidate, the predicted front and the chosen one."""

    target: str
    resource: str | None
    budget: float | None
    chosen: Candidate
    candidates: list[Candidate]
    front: list[tuple[float, float]] = field(default_factory=list)  # predicted (resource fraction, error)
    message: str = ""
    stats: dict = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    plot_path: str | None = None  # where :meth:`plot` last wrote the Pareto plot

    @property
    def pipeline(self) -> list[dict]:
        """The chosen pipeline as plain configuration dicts (``passes=`` takes them as they are)."""
        return self.chosen.pipeline

    def passes(self) -> list[Pass]:
        return [make_pass(config) for config in self.pipeline]

    def table(self) -> str:
        rows = []
        for c in sorted(self.candidates, key=lambda c: (c.source != "input", getattr(c, self.resource or "latency") or 0)):
            rows.append({
                "": "*" if c is self.chosen else "", "candidate": c.name, "source": c.source,
                "latency": c.latency, "size": c.size, "macs": c.macs, "predicted": c.predicted, "error": c.error,
                "meets target": "yes" if c.meets else "no",
            })
        return tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g", missingval="-")

    def __str__(self) -> str:
        chosen, resource = self.chosen, self.resource or "latency"
        lines = [f"target: {self.target}; chosen: {chosen.name} (* below)",
                 "chosen pipeline:\n" + describe_pipeline(chosen.pipeline)]
        measured = getattr(chosen, resource)
        if measured is not None:
            predicted = f"predicted {chosen.predicted:.3g}, " if chosen.predicted is not None else ""
            lines.append(f"{resource} (fraction of the input model): {predicted}measured {measured:.3g}; error {chosen.error:.3g}")
        if self.rounds:
            lines.append("correction rounds (aim -> predicted, measured; refine: one step from a measured point): " + "; ".join(
                f"{'refine ' if r.anchor else ''}{r.aim:.3g} -> {r.predicted:.3g}, {r.measured:.3g}" for r in self.rounds))
        stats = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.stats.items())
        lines += ([f"search: {stats}"] if stats else []) + [self.table()]
        lines += ([self.message] if self.message else []) + ([f"Pareto plot: {self.plot_path}"] if self.plot_path else [])
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return json.loads(json.dumps({
            "target": self.target, "resource": self.resource, "budget": self.budget, "message": self.message,
            "chosen": asdict(self.chosen), "candidates": [asdict(c) for c in self.candidates], "front": self.front,
            "stats": self.stats, "rounds": [asdict(r) for r in self.rounds], "plot": self.plot_path,
        }, default=str))

    def save_pipeline(self, path: str | os.PathLike) -> None:
        """Write the chosen pipeline as JSON (read back with :func:`load_pipeline`)."""
        with open(path, "w") as f:
            json.dump(self.pipeline, f, indent=1, default=str)

    def plot(self, path: str | os.PathLike) -> str:
        """Error against the budgeted resource (and the predicted front); the chosen point marked. Needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise InvalidInputError('the Pareto plot needs matplotlib: pip install "fxcompress[plot]"') from exc
        resource = self.resource or "latency"
        fig, ax = plt.subplots(figsize=(6, 4))
        if self.front:
            xs, ys = zip(*self.front)
            ax.step(xs, ys, where="post", color="0.6", label="predicted front (allocator)")
        for source, marker in (("search", "o"), ("baseline", "s"), ("input", "^")):
            points = [(getattr(c, resource), c.error) for c in self.candidates if c.source == source and getattr(c, resource) is not None]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=f"{source} (measured)")
        chosen = getattr(self.chosen, resource)
        if chosen is not None:
            ax.scatter([chosen], [self.chosen.error], s=200, facecolors="none", edgecolors="red", label="chosen")
        if self.budget is not None:
            ax.axvline(self.budget, color="red", linestyle=":", label=f"target {resource}={self.budget:g}")
        ax.set_xlabel(f"{resource} (fraction of the input model)")
        ax.set_ylabel("error")
        ax.set_title(f"fxcompress search: {self.target}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        self.plot_path = str(path)
        return self.plot_path


def describe_pipeline(configs: list[dict], shown: int = 6) -> str:
    """One line per pass: its name and the options that differ from the pass's defaults (long per-layer
    settings shortened to their first ``shown`` entries)."""
    lines = []
    for config in configs:
        pass_ = make_pass(config)
        changed = []
        for f in dataclasses.fields(pass_):
            value = getattr(pass_, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.init and value != default:
                changed.append(f"{f.name}={_short(value, shown)}")
        lines.append(f"  {config['pass']}" + (f"({', '.join(changed)})" if changed else ""))
    return "\n".join(lines)


def _short(value: Any, shown: int) -> str:
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        items = [f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in value]
    elif isinstance(value, tuple) and len(value) > shown:
        items = [str(v) for v in value]
    else:
        return repr(value)
    rest = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return "{" + ", ".join(items[:shown]) + rest + "}"


def load_pipeline(path: str | os.PathLike) -> list[Pass]:
    """The passes of a pipeline saved with :meth:`SearchResult.save_pipeline` (or any ``gm.pipeline`` as JSON)."""
    with open(path) as f:
        configs: list[Any] = json.load(f)
    if not isinstance(configs, list) or not all(isinstance(c, dict) and "pass" in c for c in configs):
        raise InvalidInputError(f"{path}: not a pipeline (a JSON list of pass configurations with a 'pass' key)")
    return [make_pass(config) for config in configs]
