"""GPTQ rounding: lower layer-output error than round-to-nearest on correlated inputs, codes in the int8 grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.passes import Int8
from fxcompress.passes._gptq import gptq_quantize, smoothed_hessian
from fxcompress.ops.int8_linear import quantize_weight_per_channel


def correlated(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features (a random mixing of a few loud and many quiet factors)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(123)) * torch.logspace(0, -2, features)[:, None]
    return torch.randn(rows, features, generator=gen) @ mixing


def output_error(weight, codes, scale, x) -> float:
    return ((weight.double() - codes.double() * scale.double()[:, None]) @ x.double().T).norm().item()


def test_gptq_beats_round_to_nearest_and_stays_in_grid():
    torch.manual_seed(0)
    weight = torch.randn(48, 96)
    calibration, held_out = correlated(512, 96, 0), correlated(256, 96, 1)
    codes, scale = gptq_quantize(weight, calibration.double().T @ calibration.double(), block=32)
    rtn_codes, rtn_scale = quantize_weight_per_channel(weight)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape
    assert codes.abs().max() <= 127
    torch.testing.assert_close(scale, rtn_scale)  # the same per-output-channel grid as round-to-nearest
    for x in (calibration, held_out):
        assert output_error(weight, codes, scale, x) < 0.8 * output_error(weight, rtn_codes, rtn_scale, x)


def test_dead_inputs_and_smoothing():
    weight = torch.randn(8, 16)
    x = correlated(64, 16, 0)
    x[:, 3] = 0
    hessian = x.double().T @ x.double()
    codes, _ = gptq_quantize(weight, hessian)
    assert (codes[:, 3] == 0).all()  # a column no input ever reaches is dropped, not rounded
    sigma = torch.rand(16) + 0.5
    smoothed = smoothed_hessian(hessian, sigma)
    scaled = x.double() / sigma.double()
    torch.testing.assert_close(smoothed, scaled.T @ scaled)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_int8_pass_with_gptq_lowers_output_error(mode):
    torch.manual_seed(0)
    model = MLP().eval()
    calibration = [correlated(64, 256, seed) for seed in range(4)]
    held_out = correlated(128, 256, 99)
    reference = model(held_out)
    errors = {}
    for gptq in (False, True):
        out = fxcompress.optimize(model, (calibration[0],), passes=[Int8(mode=mode, gptq=gptq, allow_slower=True)],
                                  calibration=calibration, report=fxcompress.ReportConfig(latency=False))
        details = out.report.results["int8"].details
        assert len(details) == 2 and all(d.get("rounding", "nearest") == ("gptq" if gptq else "nearest") for d in details)
        assert all(t.dtype == torch.int8 for name, t in out.named_parameters() if name.endswith("_int8"))
        errors[gptq] = (out(held_out) - reference).norm().item()
    assert errors[True] < errors[False]
