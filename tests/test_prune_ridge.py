"""``PruneChannels(ridge="gcv")``: the refit's ridge chosen per consumer by generalized cross-validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.pass_base import PassContext
from fxcompress.passes import PruneChannels
from fxcompress.passes.prune.ridge import MODEL_GRID, RELATIVE_GRID, gcv_ridge


def test_gcv_from_the_gram_matrix_is_the_explicit_gcv():
    """RSS and degrees of freedom from ``G̃`` alone give the same criterion as the hat matrix on the rows."""
    torch.manual_seed(0)
    rows = torch.cat([torch.randn(40, 9) @ torch.randn(9, 9), torch.ones(40, 1)], 1).double()
    weight = torch.randn(3, 10, dtype=torch.float64)
    cols = torch.tensor([0, 2, 3, 5, 6, 8, 9])  # kept columns and the bias column
    removed = torch.tensor([1, 4, 7])
    lam, relative = gcv_ridge(rows.T @ rows, weight, cols, len(rows))
    kept, target = rows[:, cols], rows[:, removed] @ weight[:, removed].T
    scale = (kept.T @ kept).diagonal().mean()

    def explicit(rel):
        hat = kept @ torch.linalg.solve(kept.T @ kept + rel * scale * torch.eye(len(cols), dtype=torch.float64), kept.T)
        rss = (target - hat @ target).square().sum()
        return rss / (1 - torch.trace(hat) / len(rows)) ** 2

    scores = torch.stack([explicit(r) for r in RELATIVE_GRID])
    assert relative == pytest.approx(float(RELATIVE_GRID[int(torch.argmin(scores))]))
    assert lam == pytest.approx(relative * float(scale))


def few_rows_pruning():
    """A 2-layer MLP with few, correlated calibration rows per kept input, and ``held_out_error(ridge)``: the
    squared error on new inputs of the model pruned by half with that refit ridge, and the pass's details."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 8)).eval()
    mix = torch.randn(32, 32)
    calibration, held_out = [torch.randn(40, 32) @ mix for _ in range(2)], torch.randn(1024, 32) @ mix
    captured = capture(model, (calibration[0],))

    def held_out_error(ridge):
        gm = copy.deepcopy(captured)
        result = PruneChannels(ratio=0.5, importance="activation", compensate="lstsq", ridge=ridge).run(
            gm, PassContext((calibration[0],), {}, calibration=calibration))
        with torch.no_grad():
            return (gm(held_out) - model(held_out)).square().sum().item(), result.details

    return held_out_error


def test_gcv_ridge_generalizes_better_than_a_tiny_ridge_with_few_rows():
    """Few calibration rows per kept input: the near-unregularized refit overfits them, GCV does not."""
    held_out_error = few_rows_pruning()
    tiny, _ = held_out_error(1e-6)
    gcv, details = held_out_error("gcv")
    assert [r["ridge"] > 1e-6 for r in details if "compensated" in r] == [True]
    assert gcv < 0.9 * tiny


def test_bad_ridge():
    with pytest.raises(PassConfigError, match="'gcv'"):
        PruneChannels(ratio=0.3, compensate="lstsq", ridge="big")


def test_model_ridge_picks_the_least_held_out_calibration_error_and_generalizes():
    """``ridge="model"``: the candidate refit on the first calibration batches that best reproduces the last one
    is chosen; with few rows per kept input that is a larger ridge, better on new inputs than the default."""
    held_out_error = few_rows_pruning()
    default, _ = held_out_error(1e-3)
    chosen, details = held_out_error("model")
    summary = details[0]
    errors = summary["ridge_errors"]
    assert tuple(errors) == MODEL_GRID and summary["ridge"] == min(errors, key=errors.get) > 1e-3
    assert chosen < 0.9 * default


def test_ridge_model_is_one_shot_only():
    with pytest.raises(PassConfigError, match="sequential"):
        PruneChannels(ratio=0.3, importance="activation", compensate="lstsq", sequential=True, ridge="model")
