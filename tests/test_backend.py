"""torch.compile(backend="fxcompress"): kept few and small, compiling is the slow part of CI."""

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.dynamo_backend import backend
from fxcompress.verify import fidelity
from zoo import ZOO


class GraphRecorder:
    """A configured fxcompress backend that remembers the graphs it handed to Inductor."""

    def __init__(self, passes=None):
        self.inner = backend(passes, fallback=False)
        self.graphs = []

    def __call__(self, gm, example_inputs):
        compiled = self.inner(gm, example_inputs)
        self.graphs.append(getattr(compiled, "fxcompress_graph", None))
        return compiled


def targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["resnet", "transformer_encoder"])
def test_compiled_matches_eager_and_bn_is_folded(name):
    make_model, make_inputs = ZOO[name]
    model, inputs = make_model(), make_inputs()
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        assert fidelity(model(*inputs), compiled(*inputs)).max_rel_err <= 1e-4
        bigger = tuple(torch.cat([x, x, x]) for x in inputs)  # recompiles with a dynamic batch
        assert fidelity(model(*bigger), compiled(*bigger)).max_rel_err <= 1e-4
    assert len(recorder.graphs) == 2 and all(g is not None for g in recorder.graphs)
    for graph in recorder.graphs:
        assert not any("batch_norm" in t for t in targets(graph))


def test_registered_name_and_graph_breaks():
    class WithBreak(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return self.b(y)

    model = fxcompress.models.init_batch_norm_statistics(WithBreak()).eval()
    x = torch.randn(2, 3, 12, 12)
    recorder = GraphRecorder()
    with torch.no_grad():
        assert fidelity(model(x), torch.compile(model, backend=recorder)(x)).max_rel_err <= 1e-4
        torch._dynamo.reset()
        assert fidelity(model(x), torch.compile(model, backend="fxcompress")(x)).max_rel_err <= 1e-4
    assert len(recorder.graphs) == 2
    assert all(not any("batch_norm" in t for t in targets(g)) for g in recorder.graphs)


def test_training_mode_behaves_like_inductor():
    make_model, make_inputs = ZOO["plain_cnn"]
    model, (x,) = make_model(), make_inputs()
    grads = []
    for compiler in ("inductor", "fxcompress"):
        torch._dynamo.reset()
        model.zero_grad()
        torch.compile(model, backend=compiler)(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours, inductors in zip(*grads):
        torch.testing.assert_close(ours, inductors)


def test_optimized_module_compiles_with_inductor_without_graph_breaks():
    make_model, make_inputs = ZOO["resnet"]
    model, inputs = make_model(), make_inputs()
    optimized = fxcompress.optimize(model, inputs, report=False)
    compiled = torch.compile(optimized, fullgraph=True)
    with torch.no_grad():
        assert fidelity(model(*inputs), compiled(*inputs)).max_rel_err <= 1e-4


def test_int8_pass_lowers_to_custom_op_in_compiled_graph():
    make_model, make_inputs = ZOO["transformer_encoder"]
    model, inputs = make_model(), make_inputs()
    recorder = GraphRecorder(passes=[*fxcompress.DEFAULT_PASSES, fxcompress.passes.Int8(min_weight_numel=0, impl="int_mm")])
    compiled = torch.compile(model, backend=recorder)
    with torch.no_grad():
        assert fidelity(model(*inputs), compiled(*inputs)).cosine > 0.9999
    (graph,) = recorder.graphs
    assert "fxcompress.int8_linear.default" in targets(graph)
    assert "aten.linear.default" not in targets(graph)
