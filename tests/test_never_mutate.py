"""The user's model is never mutated — optimize (every pass, recover), calibrate, capture, the backend —
and a model in training mode is captured in eval mode with one warning. Results are inference-only."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.errors import FxCompressWarning, InferenceOnlyError
from fxcompress.passes import Int8, LowRank, PruneChannels
from tests.untouched import assert_untouched, snapshot


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                                      nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def make_net(training: bool = False) -> Net:
    torch.manual_seed(0)
    net = Net().train(training)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    net.register_forward_hook(lambda module, args, output: None)
    return net


X = torch.randn(4, 3, 8, 8)
LOADER = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]

PATHS = {
    "default passes": lambda m: fxcompress.optimize(m, X, report=False),
    "prune + low_rank + int8": lambda m: fxcompress.optimize(
        m, X, passes=["fold_bn", PruneChannels(ratio=0.5), LowRank(rank=0.5), Int8(min_weight_numel=0)], report=False),
    "recover": lambda m: fxcompress.optimize(m, X, passes=[PruneChannels(ratio=0.5)], report=False,
                                             recover=dict(data=LOADER, steps=2)),
    "calibrate": lambda m: fxcompress.calibrate(m, LOADER),
    "capture": lambda m: fxcompress.capture(m, X),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("path", PATHS)
def test_user_model_is_untouched(path, training):
    model = make_net(training)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        PATHS[path](model)
    assert_untouched(model, before)


@pytest.mark.slow
def test_backend_leaves_the_model_untouched():
    model = make_net()
    before = snapshot(model)
    with torch.no_grad():
        torch.compile(model, backend=fxcompress.backend(passes=["fold_bn"]))(X)
    assert_untouched(model, before)


def test_training_mode_model_is_captured_in_eval_mode_with_one_warning():
    model = make_net(training=True)
    expected = make_net(training=False)(X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compressed = fxcompress.optimize(model, X, report=False)
    ours = [w for w in caught if issubclass(w.category, FxCompressWarning)]
    assert len(ours) == 1 and "training mode" in str(ours[0].message) and "model.eval()" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the user's call
    assert torch.allclose(compressed(X), expected.detach(), atol=1e-5)
    assert model.training


def test_eval_model_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxCompressWarning)
        fxcompress.optimize(make_net(), X, report=False)


def test_results_are_inference_only(tmp_path):
    compressed = fxcompress.optimize(make_net(), X, report=False)
    fxcompress.save(compressed, tmp_path / "m.pt2")
    loaded = fxcompress.load(tmp_path / "m.pt2")
    distilled, _ = fxcompress.distill(compressed, make_net(), LOADER, steps=1)
    for result in (compressed, loaded, distilled):
        assert result.eval() is result and result.train(False) is result
        with pytest.raises(InferenceOnlyError, match="fxcompress.distill"):
            result.train()
        assert torch.allclose(result(X), result.eval()(X))
