"""Rank and layer selection for the ``low_rank`` pass: options, fixed ranks, energy, a MAC budget, latency.

A layer's spectrum is the singular values S of one matrix (a linear weight, a reshaped conv
weight) or of each channel unfolding (Tucker-2: one spectrum per mode). For a truncation at rank
r, the discarded energy ``sum(S[r:]**2) / sum(S**2)`` is the squared relative error of the best
rank-r approximation (Eckart–Young); summed over the modes it bounds the Tucker-2 error (HOSVD).
"""

from __future__ import annotations

import functools
import heapq
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fxcompress import tuning
from fxcompress.errors import FxCompressWarning, PassConfigError


def validate_options(config: Any, methods: Sequence[str], whitening: Sequence[str] = ()) -> None:
    """Check a ``LowRank`` configuration; normalise ``include``/``ignore`` to tuples of strings."""
    object.__setattr__(config, "layer_ranks", _checked_layer_ranks(config.layer_ranks))
    chosen = [n for n in ("rank", "energy", "target_macs", "layer_ranks") if getattr(config, n) not in (None, ())]
    if len(chosen) != 1:
        raise PassConfigError(
            f"low_rank needs exactly one of rank=, energy=, target_macs=, layer_ranks=; got {chosen or 'none'}. "
            f"Fix: e.g. LowRank(rank=0.25) or LowRank(energy=0.9) or LowRank(target_macs=0.5)"
        )
    rank = config.rank
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float)):
        raise PassConfigError(f"low_rank rank={rank!r} must be an int >= 1 or a float fraction in (0, 1]")
    if isinstance(rank, int) and rank < 1:
        raise PassConfigError(f"low_rank rank={rank} must be >= 1; for a fraction of full rank pass a float, e.g. 0.25")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise PassConfigError(f"low_rank rank={rank} as a float is a fraction of full rank and must be in (0, 1]")
    _check_fraction("energy", config.energy, closed_top=True)
    _check_fraction("target_macs", config.target_macs, closed_top=False)
    if config.method not in methods:
        raise PassConfigError(f"low_rank method={config.method!r} is unknown; use one of {tuple(methods)}")
    if getattr(config, "whiten", None) is not None and config.whiten not in whitening:
        raise PassConfigError(f"low_rank whiten={config.whiten!r} is unknown; use None or one of {tuple(whitening)}")
    if isinstance(config.round_to, bool) or not isinstance(config.round_to, int) or config.round_to < 1:
        raise PassConfigError(f"low_rank round_to={config.round_to!r} must be an int >= 1, e.g. 8 (1: no rounding)")
    speedup = config.min_speedup
    if speedup is not None and (isinstance(speedup, bool) or not isinstance(speedup, int | float) or speedup <= 0):
        raise PassConfigError(f"low_rank min_speedup={speedup!r} must be a number > 0, e.g. 1.1, or None")
    for field_name in ("include", "ignore"):
        patterns = getattr(config, field_name)
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) for p in patterns):
            raise PassConfigError(
                f"low_rank {field_name}={patterns!r} must be glob patterns on module names, "
                f"e.g. ('encoder.layer.*.output.dense',)"
            )
        object.__setattr__(config, field_name, tuple(patterns))


def _checked_layer_ranks(value: Any) -> tuple[tuple[str, int | float], ...]:
    pairs = tuple(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list | tuple) or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise PassConfigError(f"low_rank layer_ranks={value!r} must be (layer selector, rank) pairs or a dict, e.g. {{'fc1': 32}}")
    checked = tuple((p[0], p[1]) for p in pairs)
    for name, rank in checked:
        if not isinstance(name, str) or isinstance(rank, bool) or not isinstance(rank, int | float) or not (
                rank >= 1 if isinstance(rank, int) else 0 < rank <= 1):
            raise PassConfigError(f"low_rank layer_ranks: {name!r}: {rank!r} must be an int rank >= 1 or a fraction in (0, 1]")
    return checked


def _check_fraction(field_name: str, value: Any, closed_top: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value and (value <= 1 if closed_top else value < 1)):
        interval = "(0, 1]" if closed_top else "(0, 1)"
        raise PassConfigError(f"low_rank {field_name}={value!r} must be a fraction in {interval}, e.g. 0.9")


@functools.lru_cache(maxsize=256)
def round_rank(rank: int, round_to: int, full_rank: int) -> int:
    """``rank`` rounded up to a multiple of ``round_to``, never above ``full_rank``, at least 1."""
    return max(1, min(full_rank, math.ceil(rank / round_to) * round_to))


def rank_from_spec(rank: int | float, full_rank: int) -> int:
    """An int rank is used as is (capped at full rank); a float is a fraction of the full rank."""
    if isinstance(rank, float):
        return max(1, math.ceil(rank * full_rank - 1e-9))
    return min(rank, full_rank)


def energy_kept(singular_values: torch.Tensor) -> torch.Tensor:
    """``kept[r-1]`` = share of the squared spectrum held by the first r singular values."""
    squared = singular_values.double() ** 2
    total = squared.sum()
    if total == 0:
        return torch.ones_like(squared)
    return squared.cumsum(0) / total


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum(S[:r]**2) >= energy * sum(S**2)``."""
    kept = energy_kept(singular_values)
    threshold = torch.tensor([energy - 1e-12], dtype=kept.dtype)
    return min(int(torch.searchsorted(kept, threshold).item()) + 1, len(kept))


def discarded_energy(singular_values: torch.Tensor, rank: int) -> float:
    """Squared relative error of the best rank-``rank`` approximation: ``sum(S[rank:]**2) / sum(S**2)``."""
    return float(1.0 - energy_kept(singular_values)[rank - 1]) if rank > 0 else 1.0


@dataclass(frozen=True)
class RankOption:
    """One way to factorize a layer: ranks per spectrum, its MACs and its discarded energy."""

    ranks: tuple[int, ...]
    macs: int
    loss: float


def candidate_ranks(spectra: Sequence[torch.Tensor], round_to: int) -> list[tuple[int, ...]]:
    """Rank tuples from full to smallest, all modes shrinking together in proportion to their size.

    One spectrum: every multiple of ``round_to``. Several (Tucker-2): ``ceil(full_i * t / T)`` for
    t = T..1 with T the largest full rank, rounded, duplicates dropped.
    """
    full = [len(s) for s in spectra]
    steps = max(full)
    seen, result = set(), []
    for t in range(steps, 0, -1):
        ranks = tuple(round_rank(math.ceil(f * t / steps), round_to, f) for f in full)
        if ranks not in seen:
            seen.add(ranks)
            result.append(ranks)
    return result


def _lower_hull(points: list[RankOption]) -> list[RankOption]:
    """Lower convex hull of (MACs, loss) points given by decreasing MACs: the efficient steps."""

    def slope(a: RankOption, b: RankOption) -> float:
        return (b.loss - a.loss) / (a.macs - b.macs)

    hull: list[RankOption] = []
    for point in points:
        if hull and point.macs >= hull[-1].macs:
            continue
        while len(hull) >= 2 and slope(hull[-2], hull[-1]) >= slope(hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def allocate_budget(
    original_macs: Sequence[int], options: Sequence[list[RankOption]], keep_fraction: float
) -> list[RankOption | None]:
    """Pick one option per layer (None: leave it) so the total MACs fall to ``keep_fraction`` of the original.

    Greedy on the lower convex hull of each layer's (MACs, discarded energy) curve: repeatedly take
    the step, over all layers, that discards the least energy per MAC saved, until the budget holds
    or no step is left. Options that do not save MACs are never taken.
    """
    budget = keep_fraction * sum(original_macs)
    hulls = []
    for macs, layer_options in zip(original_macs, options):
        start = RankOption((), macs, 0.0)
        cheaper = sorted((o for o in layer_options if o.macs < macs), key=lambda o: -o.macs)
        hulls.append(_lower_hull([start, *cheaper]))
    position = [0] * len(hulls)
    total = float(sum(original_macs))
    heap = []
    for i, hull in enumerate(hulls):
        if len(hull) > 1:
            heapq.heappush(heap, (_step_cost(hull, 0), i))
    while total > budget and heap:
        _, i = heapq.heappop(heap)
        hull, at = hulls[i], position[i]
        total -= hull[at].macs - hull[at + 1].macs
        position[i] = at + 1
        if at + 2 < len(hull):
            heapq.heappush(heap, (_step_cost(hull, at + 1), i))
    return [hull[at] if at > 0 else None for hull, at in zip(hulls, position)]


def _step_cost(hull: list[RankOption], at: int) -> float:
    return (hull[at + 1].loss - hull[at].loss) / (hull[at].macs - hull[at + 1].macs)


def latency_ratio(
    original: Callable[[], Any], factorized: Callable[[], Any], device: torch.device, min_run_time: float = 0.05
) -> float:
    """Median latency of ``original`` over that of ``factorized``, timed interleaved (``fxcompress.tuning.compare``)."""
    timings = tuning.compare({"original": original, "factorized": factorized}, device, min_run_time)
    return timings["original"].median_ms / timings["factorized"].median_ms


def warn_rank_one(details: Sequence[dict]) -> None:
    """Warn once when layers were factorized down to rank 1 (one singular vector: little of the layer is left)."""
    ranked_one = [d["layer"] for d in details if 1 in [int(r) for r in str(d["rank"]).split("/")]]
    if ranked_one:
        shown = ", ".join(ranked_one[:3]) + (", ..." if len(ranked_one) > 3 else "")
        warnings.warn(
            f"low_rank: {len(ranked_one)} layer(s) factorized to rank 1 ({shown}): each keeps a single "
            f"direction of its weight. Use a larger rank/energy/target_macs, or recover with fxcompress.distill.",
            FxCompressWarning, stacklevel=3,
        )
