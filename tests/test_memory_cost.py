"""Memory a pipeline keeps alive, in units of the model's weight bytes: capture holds one copy of the
weights besides the user's, a verified lossless pass keeps the pre-pass weights once (shared, never
deep-copied), and the int8 pass keeps one prepacked weight per GEMM, not one per engine it timed.

Live bytes are the storages of every reachable CPU tensor of at least ``MIN_BYTES`` (weights; not the
small activations), counted once per storage."""

from __future__ import annotations

import gc

import torch
from torch._subclasses.fake_tensor import FakeTensor

import fxcompress
from fxcompress.instrument import Instrumentation
from fxcompress.ops.qengine import prepacked
from fxcompress.report import weight_bytes

MIN_BYTES = 1 << 18


def live_weight_bytes() -> int:
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not issubclass(type(obj), FakeTensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes() >= MIN_BYTES and storage.data_ptr():
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class ConvBN(torch.nn.Module):
    def __init__(self, channels: int = 128, depth: int = 2):
        super().__init__()
        self.layers = torch.nn.Sequential(*[
            torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.BatchNorm2d(channels), torch.nn.ReLU())
            for _ in range(depth)
        ])

    def forward(self, x):
        return self.layers(x)


def mlp(width: int = 512, depth: int = 4) -> torch.nn.Module:
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())]
    return torch.nn.Sequential(*layers).eval()


def conv_bn() -> torch.nn.Module:
    model = ConvBN().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-1, 1)
    return model


class LiveBytes(Instrumentation):
    """Live weight bytes when each pass starts and right after it ran (before verification)."""

    def __init__(self):
        self.before, self.after_run_ = {}, {}

    def before_pass(self, index, pass_, gm):
        self.before[pass_.name] = live_weight_bytes()

    def after_run(self, index, pass_, gm, result):
        self.after_run_[pass_.name] = live_weight_bytes()


def test_capture_holds_one_copy_of_the_weights_besides_the_users(monkeypatch):
    model, x = conv_bn(), torch.randn(1, 128, 8, 8)
    weights = weight_bytes(model)
    base = live_weight_bytes()
    at_export = []
    export = torch.export.export

    def counting_export(*args, **kwargs):
        at_export.append(live_weight_bytes() - base)
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting_export)
    fxcompress.optimize(model, (x,), [], report=fxcompress.ReportConfig(latency=False), progress=False)
    assert at_export and max(at_export) <= 1.2 * weights, f"{max(at_export) / weights:.2f}x the weights alive during export"


def test_a_lossless_pass_keeps_the_pre_pass_weights_once_and_shared():
    model, x = conv_bn(), torch.randn(1, 128, 8, 8)
    live = LiveBytes()
    gm = fxcompress.optimize(model, (x,), ["fold_bn"], report=fxcompress.ReportConfig(latency=False), progress=False,
                             instrumentations=[live])
    assert gm.report.results["fold_bn"].rewritten
    weights = weight_bytes(model)
    new_during_pass = live.after_run_["fold_bn"] - live.before["fold_bn"]
    # the folded weights are new (1x); the snapshot shares the old ones instead of copying them (another 1x)
    assert new_during_pass <= 1.2 * weights, f"{new_during_pass / weights:.2f}x the weights added by fold_bn"
    assert 0.8 * weights <= new_during_pass


def test_int8_keeps_one_prepacked_weight_per_gemm_not_one_per_timed_engine(monkeypatch, tmp_path):
    """Every engine is timed at the example's 64 rows and at one row, there on cold copies of the weight
    (each packed): none of those packs outlives the pass. ``allow_slower``: every GEMM int8 whatever the timings."""
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path))  # nothing cached: every engine is timed
    model, x = mlp(), torch.randn(64, 512)
    gc.collect()
    packs_before = len(prepacked)
    gm = fxcompress.optimize(model, (x,), [fxcompress.passes.Int8(allow_slower=True)], report=fxcompress.ReportConfig(latency=False),
                             progress=False)
    assert all("decode_timings" in d for d in gm.report.results["int8"].details)
    gemms = [n for n in gm.graph.nodes if n.op == "call_function" and "int8_linear" in str(n.target)]
    assert len(gemms) == 4, gm.code
    gc.collect()
    assert len(prepacked) - packs_before <= len(gemms), "packs built while timing the engines are kept"
