"""What ``optimize(..., target=Target(...))`` searches for: a budget, an error bound, the data to judge by."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InvalidInputError

RESOURCES = ("latency", "size", "macs")


@dataclass(frozen=True)
class Target:
    """A budget as a fraction of the input model, the error allowed, and the search's limits.

    At most one of ``latency`` (measured time of one forward on this machine), ``size`` (weight bytes)
    and ``macs`` (multiply-accumulates), each a fraction of the input model's in (0, 1]. With a budget
    the search returns the pipeline that meets it with the least error; with only ``max_error`` the
    fastest pipeline whose error stays within it.

    Error: by default ``1 − cosine`` between the outputs of the candidate and of the input model on
    ``calibration`` batches (or the example inputs); with ``metric`` (``model -> quality``, higher is
    better, e.g. accuracy in [0, 1]) it is ``metric(input model) − metric(candidate)``, in the metric's
    units. ``tolerance``: a measured latency within this fraction above the budget counts as meeting it
    (timing noise). ``time_budget_s``: the sensitivity analysis stops measuring new options after it.
    The option grids (``prune_ratios``, ``ranks``, ``int8``) and ``passes`` (which lossy passes to
    search over) define the search space. ``verify_candidates``: the most allocations built and
    measured end to end (the correction rounds; only ``max_error``: proposals within it).
    ``baselines``: also build and measure each single lossy pass, for the Pareto report.
    """

    latency: float | None = None
    size: float | None = None
    macs: float | None = None
    max_error: float | None = None
    metric: Callable[[Any], float] | None = None
    calibration: Any = None
    time_budget_s: float | None = None
    tolerance: float = 0.05
    passes: tuple[str, ...] = ("prune_channels", "low_rank", "int8")
    prune_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    ranks: tuple[float, ...] = (0.5, 0.25, 0.125)
    verify_candidates: int = 3
    baselines: bool = True

    def __post_init__(self) -> None:
        budgets = [name for name in RESOURCES if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise InvalidInputError(f"Target takes one budget, not {budgets}: e.g. Target(latency=0.5, max_error=0.01)")
        if not budgets and self.max_error is None:
            raise InvalidInputError("Target needs a budget (latency=, size= or macs=, a fraction of the input model) "
                                    "or max_error=, e.g. Target(latency=0.5)")
        for name in budgets:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise InvalidInputError(f"Target({name}={value!r}): a budget is a fraction of the input model in (0, 1], e.g. 0.5")
        for name in ("max_error", "time_budget_s", "tolerance"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0
                                      or not math.isfinite(value)):
                raise InvalidInputError(f"Target({name}={value!r}) must be a finite number >= 0")
        if self.metric is not None and not callable(self.metric):
            raise InvalidInputError("Target(metric=...) must be a callable model -> quality (higher is better), e.g. accuracy")
        unknown = sorted(set(self.passes) - {"prune_channels", "low_rank", "int8"})
        if unknown or not self.passes:
            raise InvalidInputError(f"Target(passes={self.passes!r}): search over some of 'prune_channels', 'low_rank', 'int8'")
        object.__setattr__(self, "passes", tuple(self.passes))
        for name, low, high in (("prune_ratios", 0.0, 1.0), ("ranks", 0.0, 1.0)):
            values = tuple(getattr(self, name))
            if not all(isinstance(v, float) and low < v < high for v in values):
                raise InvalidInputError(f"Target({name}={values!r}): fractions strictly between 0 and 1, e.g. (0.25, 0.5)")
            object.__setattr__(self, name, values)
        if not isinstance(self.verify_candidates, int) or self.verify_candidates < 1:
            raise InvalidInputError(f"Target(verify_candidates={self.verify_candidates!r}) must be an int >= 1")

    @property
    def resource(self) -> str | None:
        """The budgeted quantity (``"latency"``, ``"size"``, ``"macs"``) or ``None`` (only ``max_error``)."""
        return next((name for name in RESOURCES if getattr(self, name) is not None), None)

    @property
    def budget(self) -> float | None:
        return getattr(self, self.resource) if self.resource else None

    def describe(self) -> str:
        parts = [f"{self.resource}<={self.budget:g}"] if self.resource else []
        if self.max_error is not None:
            parts.append(f"error<={self.max_error:g}")
        return ", ".join(parts)


def parse_target(text: str, max_error: float | None = None) -> Target:
    """``"latency=0.5"`` (the CLI's ``--target``) as a :class:`Target`."""
    name, sep, value = text.partition("=")
    if not sep or name not in RESOURCES:
        raise InvalidInputError(f"--target {text!r} must look like RESOURCE=FRACTION with RESOURCE one of {RESOURCES}, e.g. latency=0.5")
    try:
        fraction = float(value)
    except ValueError as exc:
        raise InvalidInputError(f"--target {text!r}: {value!r} is not a number") from exc
    return Target(**{name: fraction}, max_error=max_error)
