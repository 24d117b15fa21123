"""``PruneChannels(allocation="model")``: the MAC budget shared between heads and channels by calibration error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.pass_base import PassContext
from fxcompress.passes import PruneChannels
from fxcompress.report import count_macs


class AttentionThenMLP(nn.Module):
    """Four heads whose output dominates, then a feed-forward block whose channels add little."""

    def __init__(self, dim=32, heads=4, hidden=64, mlp_scale=0.05):
        super().__init__()
        self.heads, self.mlp_scale = heads, mlp_scale
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (m(x).view(b, n, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        h = self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        return h + self.mlp_scale * self.fc2(F.gelu(self.fc1(h)))


def pruned(allocation, calibration, ratio=0.25):
    torch.manual_seed(0)
    model = AttentionThenMLP().eval()
    gm = capture(model, (calibration[0],))
    ctx = PassContext((calibration[0],), {}, calibration=calibration)
    result = PruneChannels(ratio=ratio, importance="activation", compensate="lstsq", ridge=1e-2,
                           allocation=allocation).run(gm, ctx)
    return model, gm, result, count_macs(gm, ctx)


def test_allocation_moves_the_budget_to_the_cheaper_groups_at_no_more_macs():
    torch.manual_seed(1)
    calibration, new = [torch.randn(8, 6, 32) for _ in range(4)], torch.randn(64, 6, 32)
    model, uniform, _, uniform_macs = pruned("uniform", calibration)
    _, allocated, result, allocated_macs = pruned("model", calibration)
    summary = result.details[0]
    heads_ratio, channels_ratio = summary["allocation"]
    errors = summary["allocation_errors"]
    assert heads_ratio < 0.25 < channels_ratio  # heads cost more output error than feed-forward channels
    assert errors[f"{heads_ratio:g}/{channels_ratio:g}"] == min(errors.values()) < errors["0.25/0.25"]
    assert allocated_macs <= uniform_macs
    with torch.no_grad():
        reference = model(new)
        assert (allocated(new) - reference).square().sum() < (uniform(new) - reference).square().sum()


def test_allocation_at_ratio_zero_changes_nothing():
    calibration = [torch.randn(4, 6, 32) for _ in range(4)]
    model, gm, result, _ = pruned("model", calibration, ratio=0.0)
    assert not result.changed
    torch.testing.assert_close(gm(calibration[0]), model(calibration[0]))


def test_bad_allocation_options():
    with pytest.raises(PassConfigError, match="'uniform'"):
        PruneChannels(ratio=0.3, allocation="greedy")
    with pytest.raises(PassConfigError, match="sequential"):
        PruneChannels(ratio=0.3, compensate="lstsq", sequential=True, allocation="model")
