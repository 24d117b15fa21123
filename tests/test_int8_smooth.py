"""SmoothQuant folded into a preceding LayerNorm/RMSNorm, and static int8 with SmoothQuant."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.passes import Int8
from fxcompress.verify import fidelity

aten = torch.ops.aten


class PreNormBlock(nn.Module):
    """``x + W2·gelu(W1·norm(x))``: only the first linear reads the norm's output (pre-LN / Llama style)."""

    def __init__(self, norm: nn.Module, post_norm: bool = False):
        super().__init__()
        self.norm, self.post_norm = norm, post_norm
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x):
        h = self.norm(x)
        return (h if self.post_norm else x) + self.down(torch.nn.functional.gelu(self.up(h)))  # post-LN: h is read twice


def outlier_inputs(seed: int, batches: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(32, 64, generator=gen)
        x[:, :3] *= 40.0
        out.append(x)
    return out


def block(norm: str, post_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = PreNormBlock(nn.LayerNorm(64) if norm == "layer_norm" else nn.RMSNorm(64), post_norm).eval()
    with torch.no_grad():  # a norm weight with outlier channels, as in trained transformers
        model.norm.weight.copy_(torch.rand(64) + 0.5)
        model.norm.weight[:3] = 30.0
    return model


def smoothed(model, calibration, **options):
    config = Int8(min_weight_numel=0, smooth_alpha=0.5, impl="int_mm", allow_slower=True, **options)
    return fxcompress.optimize(model, (calibration[0],), passes=[config], calibration=calibration, report=False)


def mul_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.mul.Tensor)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_folded_smoothing_equals_the_explicit_multiply(norm, mode):
    model, calibration = block(norm), outlier_inputs(0)
    extra = {"activation_scales": fxcompress.calibrate(model, calibration)} if mode == "static" else {}
    folded = smoothed(model, calibration, mode=mode, **extra)
    explicit = smoothed(model, calibration, mode=mode, fold_smoothing=False, **extra)
    details = int8_details(folded)
    assert details["up"]["smoothing"] == "folded into norm"
    assert details["down"]["smoothing"].startswith("explicit multiply: ")  # gelu output: no norm to fold into
    assert mul_count(explicit) - mul_count(folded) == 1  # the up-projection's multiply is gone, nothing replaced it
    assert not torch.equal(folded.norm.weight, model.norm.weight) and torch.equal(model.norm.weight, block(norm).norm.weight)
    for x in outlier_inputs(1, 2):
        torch.testing.assert_close(folded(x), explicit(x), rtol=1e-4, atol=1e-4 * explicit(x).abs().max().item())


def int8_details(gm) -> dict[str, dict]:
    return {d["layer"]: d for d in gm.report.results["int8"].details}


def test_no_fold_when_the_norm_output_is_also_read_elsewhere():
    model, calibration = block("layer_norm", post_norm=True), outlier_inputs(0)
    gm = smoothed(model, calibration)
    assert int8_details(gm)["up"]["smoothing"].startswith("explicit multiply: ") and "is also read by" in int8_details(gm)["up"]["smoothing"]
    torch.testing.assert_close(gm.norm.weight, model.norm.weight)


def test_static_smoothquant_beats_static_on_outlier_channels():
    model, calibration = block("layer_norm"), outlier_inputs(0)
    scales = fxcompress.calibrate(model, calibration)
    plain = fxcompress.optimize(model, (calibration[0],), passes=[Int8(mode="static", activation_scales=scales, min_weight_numel=0,
                                                                      impl="int_mm", allow_slower=True)], report=False)
    smooth = smoothed(model, calibration, mode="static", activation_scales=scales)
    held_out = torch.cat(outlier_inputs(2, 2))
    reference = model(held_out)
    assert fidelity(reference, smooth(held_out)).max_abs_err < 0.7 * fidelity(reference, plain(held_out)).max_abs_err
    # the static scale of the smoothed input is that of x/σ: below the unsmoothed one (outliers moved to the weights)
    assert int8_details(smooth)["up"]["input_scale"] < dict(scales)["up"]
