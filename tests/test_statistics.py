"""Calibration statistics: streaming equals all-at-once, bounded memory, caching and invalidation."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.capture import capture
from fxcompress.errors import InvalidInputError
from fxcompress.pass_base import PassContext
from fxcompress.statistics import LAYER_OPS, ValueRecorder, check_calibration, collect_statistics, input_recorder, layer_statistics


class ConvMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.big = nn.Conv2d(8, 8, 5, padding=2)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = torch.relu(self.big(torch.relu(self.conv(x))))
        return self.fc(y.permute(0, 2, 3, 1))  # a linear on a 4-D input: tokens are N·H·W


def layers(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LAYER_OPS]


@pytest.fixture(scope="module")
def model_and_graph():
    torch.manual_seed(0)
    model = ConvMLP().eval()
    return model, capture(model, (torch.randn(2, 3, 12, 12),))


def test_streaming_equals_all_at_once(model_and_graph):
    model, gm = model_and_graph
    batches = [torch.randn(3, 3, 12, 12) for _ in range(4)]
    streamed = collect_statistics(gm, batches, layers(gm), max_gram_features=100, progress=False)
    whole = collect_statistics(gm, [torch.cat(batches)], layers(gm), max_gram_features=100, progress=False)
    assert set(streamed) == set(whole) and len(streamed) == 3
    for name, s in streamed.items():
        w = whole[name]
        assert s.positions == w.positions and s.rows == w.rows
        for attr in ("channel_sum", "channel_sq", "channel_abs", "gram", "feature_sum"):
            a, b = getattr(s, attr), getattr(w, attr)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())  # fp32 per batch
    # the Gram matrix is XᵀX of exactly the columns the weight multiplies (unfolded patches, padding included)
    x = torch.cat(batches)
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27).double()
    conv = next(n for n in layers(gm) if "conv" in n.name and streamed[n.name].channels == 3)
    torch.testing.assert_close(streamed[conv.name].gram, patches.T @ patches, rtol=1e-5, atol=1e-4)
    # the 5×5 conv has 8·25 = 200 features > 100: diagonal statistics only, with the reason
    big = next(n for n in layers(gm) if streamed[n.name].channels == 8 and n.target is not torch.ops.aten.linear.default)
    assert streamed[big.name].gram is None and "200 input features" in streamed[big.name].reason
    hidden = torch.relu(model.conv(x))
    torch.testing.assert_close(streamed[big.name].channel_sq, hidden.double().square().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated lazy module attributes warns
        return sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())


def test_memory_does_not_grow_with_batches(model_and_graph):
    _, gm = model_and_graph

    def run(count):
        inputs = []

        def batches():
            for _ in range(count):
                batch = torch.randn(2, 3, 12, 12)
                inputs.append(torch.utils.weak.WeakTensorKeyDictionary())
                inputs[-1][batch] = True
                yield batch

        stats = collect_statistics(gm, batches(), layers(gm), progress=False)
        assert all(len(d) == 0 for d in inputs), "a calibration batch is still referenced"
        size = sum(s.nbytes() for s in stats.values())
        del stats
        return size, live_tensors()

    run(1)  # warm-up: lazily created module-level tensors
    assert run(2) == run(8)  # the same bytes of statistics, and no tensor of the extra batches left alive


def test_cache_and_invalidation(model_and_graph):
    _, gm = model_and_graph
    gm = __import__("copy").deepcopy(gm)
    ctx = PassContext((torch.randn(2, 3, 12, 12),), {}, calibration=[torch.randn(2, 3, 12, 12)])
    nodes = layers(gm)
    first = layer_statistics(gm, ctx, nodes)
    again = layer_statistics(gm, ctx, nodes)
    assert ctx.analyses["input_statistics"].collections == 1
    assert all(first[k] is again[k] for k in first)
    with torch.no_grad():
        gm.big.weight.mul_(2)  # rewrites `big` and what feeds `fc`, not what feeds `conv`
    third = layer_statistics(gm, ctx, nodes)
    assert ctx.analyses["input_statistics"].collections == 2
    conv, fc = nodes[0].name, nodes[2].name
    assert third[conv] is first[conv]
    assert third[fc] is not first[fc]
    assert not torch.allclose(third[fc].channel_sq, first[fc].channel_sq)


def test_bad_calibration_is_one_clear_error():
    with pytest.raises(InvalidInputError, match="one-shot iterator"):
        check_calibration(x for x in [torch.randn(1)])
    with pytest.raises(InvalidInputError, match="iterable of batches"):
        check_calibration(3)


def test_layers_reading_the_same_input_share_one_accumulation():
    class Siblings(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 4), nn.Linear(8, 6)

        def forward(self, x):
            return self.q(x).sum(-1) + self.k(x).sum(-1)

    gm = capture(Siblings().eval(), (torch.randn(2, 5, 8),))
    batches = [torch.randn(2, 5, 8) for _ in range(3)]
    stats = collect_statistics(gm, batches, layers(gm), progress=False)
    q, k = (stats[n.name] for n in layers(gm))
    assert q is k and q.rows == 30
    x = torch.cat(batches).reshape(-1, 8).double()
    torch.testing.assert_close(q.gram, x.T @ x, rtol=1e-5, atol=1e-5)


def test_value_recorder_stops_once_every_value_exists(model_and_graph):
    """Outputs of named nodes (one node under two keys), layers' inputs under the layers' names; the run
    stops before the graph's output unless ``stop=False``."""
    model, gm = model_and_graph
    conv, big, fc = layers(gm)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        first = model.conv(x)
        recorder = ValueRecorder(gm, {"conv": conv.name, "again": conv.name})
        assert recorder.run(x) is None and set(recorder.recorded) == {"conv", "again"}
        torch.testing.assert_close(recorder.recorded["again"], first)
        inputs = input_recorder(gm, [big.name, fc.name, "no_such_layer"]).record(x)
        assert set(inputs) == {big.name, fc.name}
        torch.testing.assert_close(inputs[big.name], torch.relu(first))
        whole = ValueRecorder(gm, [fc.name], stop=False)
        torch.testing.assert_close(whole.run(x), model(x))
        torch.testing.assert_close(whole.recorded[fc.name], model(x))
