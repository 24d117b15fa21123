"""Ranks from spectra for the ``low_rank`` pass: fixed ranks, fractions of full rank, energy kept.

A layer's spectrum is the singular values S of one matrix (a linear weight, a reshaped conv
weight) or of each channel unfolding (Tucker-2: one spectrum per mode). For a truncation at rank
r, the discarded energy ``sum(S[r:]**2) / sum(S**2)`` is the squared relative error of the best
rank-r approximation (Eckart–Young); summed over the modes it bounds the Tucker-2 error (HOSVD).
The ``target_macs`` budget over all layers is :mod:`fxcompress.passes._rank_budget`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Sequence

import torch

from fxcompress.errors import FxCompressWarning, PassConfigError


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


def checked_layer_ranks(value: Any) -> tuple[tuple[str, int | float], ...]:
    pairs = tuple(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list | tuple) or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise PassConfigError(f"low_rank layer_ranks={value!r} must be (layer selector, rank) pairs or a dict, e.g. {{'fc1': 32}}")
    checked = tuple((p[0], p[1]) for p in pairs)
    for name, rank in checked:
        if not isinstance(name, str) or isinstance(rank, bool) or not isinstance(rank, int | float) or not (
                rank >= 1 if isinstance(rank, int) else 0 < rank <= 1):
            raise PassConfigError(f"low_rank layer_ranks: {name!r}: {rank!r} must be an int rank >= 1 or a fraction in (0, 1]")
    return checked


def check_fraction(field_name: str, value: Any, closed_top: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value and (value <= 1 if closed_top else value < 1)):
        interval = "(0, 1]" if closed_top else "(0, 1)"
        raise PassConfigError(f"low_rank {field_name}={value!r} must be a fraction in {interval}, e.g. 0.9")


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
