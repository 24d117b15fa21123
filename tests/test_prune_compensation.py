"""Data-aware pruning: activation importance and bias / least-squares compensation of the consumers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fxcompress import ir
from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.models import init_batch_norm_statistics, transformer_small
from fxcompress.pass_base import PassContext
from fxcompress.passes import PruneChannels
from fxcompress.verify import node_values


class ConvNet(nn.Module):
    """conv → BN → ReLU → 3×3 conv; the last conv's outputs are the model's, so only its inputs are pruned."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def pruned(model, calibration, captured=None, **options):
    gm = copy.deepcopy(captured) if captured is not None else capture(model, (calibration[0],))
    ctx = PassContext((calibration[0],), {}, calibration=calibration)
    result = PruneChannels(**options).run(gm, ctx)
    return gm, result


def output_error(gm, model, batches) -> float:
    with torch.no_grad():
        return sum((gm(x) - model(x)).square().sum().item() for x in batches)


@pytest.fixture(scope="module")
def conv_case():
    torch.manual_seed(0)
    model = init_batch_norm_statistics(ConvNet()).eval()
    return model, [torch.randn(4, 3, 10, 10) for _ in range(3)]


def test_lstsq_reduces_consumer_error_in_a_conv_net(conv_case):
    model, calibration = conv_case
    errors, captured = {}, capture(model, (calibration[0],))
    for compensate in (None, "bias", "lstsq"):
        gm, result = pruned(model, calibration, captured, ratio=0.5, importance="activation", compensate=compensate)
        assert gm.conv1.weight.shape[0] == 8 and gm.conv2.weight.shape[1] == 8
        errors[compensate] = output_error(gm, model, calibration)
    rows = [r for r in result.details if "compensated" in r]
    assert rows == [{"compensated": "conv2", "removed_inputs": 8, "method": "lstsq"}]
    assert errors["lstsq"] < errors["bias"] < errors[None]
    assert errors["lstsq"] < 0.7 * errors[None]


def test_ratio_zero_with_compensation_is_exact(conv_case):
    model, calibration = conv_case
    gm, result = pruned(model, calibration, ratio=0.0, importance="activation", compensate="lstsq")
    assert not result.changed
    torch.testing.assert_close(gm(calibration[0]), model(calibration[0]), rtol=1e-5, atol=1e-5)


def test_lstsq_reduces_mlp_consumer_error_in_a_transformer():
    torch.manual_seed(0)
    model = transformer_small()
    calibration = [torch.randint(0, 1000, (4, 16)) for _ in range(3)]
    reference = capture(model, (calibration[0],))
    consumer = next(n.name for n in reference.graph.nodes if n.op == "call_function" and "layers.0.mlp.2" in str(n.meta.get("nn_module_stack", "")) and n.target is torch.ops.aten.linear.default)

    def consumer_error(gm):
        return sum((node_values(gm, (x,), {}, {consumer})[consumer] - node_values(reference, (x,), {}, {consumer})[consumer]).square().sum().item() for x in calibration)

    errors = {}
    for compensate in (None, "bias", "lstsq"):
        gm, result = pruned(model, calibration, reference, ratio=0.5, importance="activation", compensate=compensate,
                            ignore=("layers.*.attention.*",))
        assert ir.get_attr(gm, "layers.0.mlp.2.weight").shape[1] == 256
        errors[compensate] = consumer_error(gm)
    assert errors["lstsq"] < errors["bias"] <= errors[None] * 1.0001
    assert errors["lstsq"] < 0.7 * errors[None]


def test_activation_importance_sees_through_rescaled_weights():
    """fc1 rows × s, fc2 columns ÷ s: the same function, but l1 importance is misled; activation is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    scale = torch.logspace(-1.5, 1.5, 32)[torch.randperm(32)]
    with torch.no_grad():
        model[0].weight.mul_(scale[:, None]), model[0].bias.mul_(scale), model[2].weight.div_(scale)
    calibration = [torch.randn(64, 16) for _ in range(2)]
    errors = {imp: output_error(pruned(model, calibration, ratio=0.5, importance=imp)[0], model, calibration) for imp in ("l1", "activation")}
    assert errors["activation"] < 0.5 * errors["l1"]


def test_bad_compensation_options():
    with pytest.raises(PassConfigError, match="compensate"):
        PruneChannels(ratio=0.3, compensate="refit")
    with pytest.raises(PassConfigError, match="ridge"):
        PruneChannels(ratio=0.3, compensate="lstsq", ridge=-1.0)
