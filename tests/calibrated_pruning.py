"""The set-up the sequential-pruning tests share: a model with correlated calibration batches and its
capture (a case), and what pruning a copy of the capture does."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from fxcompress.capture import capture
from fxcompress.pass_base import PassContext, PassResult
from fxcompress.passes import PruneChannels


def calibrated_case(model: nn.Module, rows: int) -> tuple[nn.Module, list[torch.Tensor], fx.GraphModule]:
    """``(model, calibration, captured)``: four batches of ``rows`` correlated 16-feature inputs."""
    mix = torch.randn(16, 16)
    calibration = [torch.randn(rows, 16) @ mix for _ in range(4)]
    return model, calibration, capture(model, (calibration[0],))


def pruned(case, **options) -> tuple[fx.GraphModule, PassResult]:
    """A copy of the case's capture pruned by ``PruneChannels(**options)`` on its calibration data, and the result."""
    _, calibration, captured = case
    gm = copy.deepcopy(captured)
    result = PruneChannels(**options).run(gm, PassContext((calibration[0],), {}, calibration=calibration))
    return gm, result


def pruned_error(case, **options) -> tuple[float, list]:
    """The summed squared output error of a copy pruned at ratio 0.5 with ``options``, and the pass's details."""
    model, calibration, _ = case
    gm, result = pruned(case, ratio=0.5, **options)
    with torch.no_grad():
        return sum((gm(x) - model(x)).square().sum().item() for x in calibration), result.details
