"""Residual-aware sequential refit of ``prune_channels`` (``sequential=True, residual=True``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fxcompress import ir
from fxcompress.errors import PassConfigError
from fxcompress.passes import PruneChannels
from fxcompress.passes.prune.residual import residual_cross, residual_operands
from tests.calibrated_pruning import calibrated_case, pruned, pruned_error


class Block(nn.Module):
    """Post-norm residual MLP block, as in BERT: ``norm(x + down(relu(up(x))))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.down(torch.relu(self.up(x))))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(16, 64) for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


@pytest.fixture(scope="module")
def residual_case():
    torch.manual_seed(0)
    return calibrated_case(ResidualNet().eval(), rows=256)


@pytest.mark.parametrize("importance", ["activation", "reconstruction"])
def test_residual_refit_beats_the_plain_sequential_refit(residual_case, importance):
    """Each block's down-projection also takes out the error the earlier blocks left in the residual stream."""
    options = dict(importance=importance, compensate="lstsq", sequential=True)
    plain, _ = pruned_error(residual_case, **options)
    residual, details = pruned_error(residual_case, **options, residual=True)
    assert [r["method"] for r in details if "compensated" in r] == ["lstsq + residual"] * 3
    assert residual < 0.9 * plain


def test_residual_ratio_zero_is_exact(residual_case):
    model, calibration, _ = residual_case
    gm, result = pruned(residual_case, ratio=0.0, importance="activation", compensate="lstsq", sequential=True, residual=True)
    assert not result.changed
    torch.testing.assert_close(gm(calibration[0]), model(calibration[0]), rtol=1e-5, atol=1e-5)


def test_residual_cross_is_the_inputs_times_the_residual_drift(residual_case):
    """``D = [X̂, 1]ᵀ(R − R̂)`` for the second block's down-projection, against the modules run by hand."""
    model, calibration, reference = residual_case
    changed = copy.deepcopy(reference)
    with torch.no_grad():
        ir.get_attr(changed, "blocks.0.up.weight").mul_(0.5)
    linears = [n for n in changed.graph.nodes if n.target is torch.ops.aten.linear.default]
    down = linears[3]  # blocks.1.down
    assert set(residual_operands(changed, linears)) == {linears[1].name, linears[3].name, linears[5].name}
    drift = residual_cross(changed, reference, calibration[:2], [down])[down.name]
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.blocks[0].up.weight.mul_(0.5)
        x = torch.cat(calibration[:2])
        original, pruned = model.blocks[0](x), edited.blocks[0](x)
        rows = torch.cat([torch.relu(edited.blocks[1].up(pruned)), torch.ones(len(x), 1)], 1)
    assert drift.rows == len(x)
    torch.testing.assert_close(drift.cross.float(), rows.T @ (original - pruned), rtol=1e-4, atol=1e-3)
    same = residual_cross(reference, reference, calibration[:1], [down])[down.name]
    assert same.cross.abs().max().item() == 0


def test_residual_needs_sequential_and_compensation():
    with pytest.raises(PassConfigError, match="sequential=True"):
        PruneChannels(ratio=0.3, importance="activation", compensate="lstsq", residual=True)
    with pytest.raises(PassConfigError, match="compensate"):
        PruneChannels(ratio=0.3, importance="activation", sequential=True, residual=True)
