"""Dynamic shapes: every dim the model allows stays dynamic through capture, every pass, save/load
and the torch.compile backend; the pass manager verifies at a second shape; a shape the graph
cannot take raises an error that names the input, the dim and the fix.

Each family is captured once (``capture`` + ``PassManager`` is what ``optimize`` runs, without
the report); each pass then runs on a copy.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.export import Dim

import fxcompress
from fxcompress import cli
from fxcompress.capture import capture
from fxcompress.manager import PassManager
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.verify import fidelity, output_signature
from tests import dynamic_zoo as zoo


def run(module, inputs):
    with torch.no_grad():
        return module(**inputs) if isinstance(inputs, dict) else module(*inputs)


def context(inputs) -> PassContext:
    return PassContext.of(inputs)


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            make_model, make_inputs = zoo.FAMILIES[family]
            model, example = make_model(), make_inputs(zoo.EXAMPLE_BATCH, None)
            cache[family] = (model, example, capture(model, example))
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_every_pass_keeps_dynamic_dims(family, captured):
    model, example, gm = captured(family)
    make_inputs = zoo.FAMILIES[family][1]
    for pass_name in zoo.PASSES:
        pass_ = zoo.pass_under_test(pass_name)
        compressed = copy.deepcopy(gm)
        manager = PassManager([pass_])
        (record,) = manager.run(compressed, context(example))
        assert manager.probe is not None, "every family has a dynamic dim, so a second shape is verified"
        example_error = fidelity(run(model, example), run(compressed, example)).max_rel_err
        for shape, (batch, size) in zoo.shapes(family).items():
            inputs = make_inputs(batch, size)
            expected, got = run(model, inputs), run(compressed, inputs)
            assert output_signature(got) == output_signature(expected), (pass_name, shape)
            error = fidelity(expected, got).max_rel_err
            assert error <= zoo.tolerance(pass_.lossless, example_error), (pass_name, shape, error, example_error)
        if pass_name in ("prune_channels", "low_rank", "int8") and family not in ("gpt2",):
            assert record.result.rewritten, (family, pass_name)  # GPT-2's Conv1D is addmm: not a candidate


def test_vit_image_size_is_reported_static_with_the_reason_and_rejected_clearly(captured):
    _, example, gm = captured("vit")
    static = {(s["dim"], s["size"]): s for s in gm.meta["fxcompress_shapes"].specialized()}
    assert set(static) == {(1, 3), (2, 16), (3, 16)}
    assert static[(2, 16)]["kind"] == "model" and "modeling_vit.py" in static[(2, 16)]["reason"]
    assert gm.meta["fxcompress_shapes"].dynamic() == ["pixel_values dim 0: [2, inf]"]
    with pytest.raises(fxcompress.InputShapeError) as info:
        gm(pixel_values=torch.randn(2, 3, 20, 20))
    message = str(info.value)
    assert "'pixel_values' dim 2 has size 20" in message and "fixed at 16" in message and "modeling_vit.py" in message


def test_unsolvable_spatial_guards_keep_the_batch_dynamic_and_leave_the_inputs_unmarked():
    # at 32 px two poolings leave 1x1 before an adaptive pool: export cannot solve that guard with
    # symbolic spatial dims (a NotImplementedError from sympy), but it can with only the batch dynamic
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4, padding=1), torch.nn.MaxPool2d(3, 2), torch.nn.MaxPool2d(3, 2),
                                torch.nn.AdaptiveAvgPool2d((2, 2)), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = capture(model, (x,))
    shapes = gm.meta["fxcompress_shapes"]
    assert shapes.dynamic() == ["input dim 0: [2, inf]"]
    assert {s["dim"] for s in shapes.specialized()} == {1, 2, 3}
    assert all("only dim 0 is dynamic" in s["reason"] for s in shapes.specialized() if s["dim"] in (2, 3))
    assert not hasattr(x, "_dynamo_weak_dynamic_indices")  # export's Dim.AUTO marks stayed on its own aliases
    bigger = torch.randn(5, 3, 32, 32)
    assert fidelity(run(model, (bigger,)), run(gm, (bigger,))).max_rel_err <= 1e-5
    with pytest.raises(fxcompress.InputShapeError, match="only dim 0 is dynamic"):
        gm(torch.randn(2, 3, 48, 48))


def test_length_beyond_the_position_table_is_rejected_with_the_range(captured):
    _, _, gm = captured("bert")
    assert "input_ids dim 1: [2, 512]" in gm.meta["fxcompress_shapes"].dynamic()
    with pytest.raises(fxcompress.InputShapeError, match=r"'input_ids' dim 1 has size 600, outside the range \[2, 512\]"):
        run(gm, zoo.tokens(2, 600))


@pytest.mark.parametrize("family, small, big", [("cnn", (1, None), (4, 20)), ("encoder", (1, 1), (4, 9))])
def test_size_one_example_gives_a_model_that_runs_at_other_sizes(family, small, big):
    make_model, make_inputs = zoo.FAMILIES[family]
    model = make_model()
    compressed = fxcompress.optimize(model, make_inputs(*small), report=False)
    widened = compressed.report.shapes.widened
    assert widened and all("dim" in w for w in widened) and compressed.report.shapes.second_shape
    for shape in (small, big):
        inputs = make_inputs(*shape)
        assert fidelity(run(model, inputs), run(compressed, inputs)).max_rel_err <= 1e-5


def test_save_load_keeps_dynamic_dims(tmp_path):
    make_model, make_inputs = zoo.FAMILIES["encoder"]
    model = make_model()
    compressed = fxcompress.optimize(model, make_inputs(2, None), passes=["fold_bn", zoo.pass_under_test("int8")], report=False)
    fxcompress.save(compressed, tmp_path / "model.pt2")
    loaded = fxcompress.load(tmp_path / "model.pt2")
    for shape in ((3, 7), (1, 20)):
        inputs = make_inputs(*shape)
        assert fidelity(run(compressed, inputs), run(loaded, inputs)).max_rel_err <= 1e-5


def test_pinned_shapes_and_their_guard_errors_survive_save_load(tmp_path):
    make_model, make_inputs = zoo.FAMILIES["cnn"]
    model, example = make_model(), make_inputs(2, None)
    static = fxcompress.optimize(model, example, dynamic=False, report=False)
    assert static.report.shapes.dynamic() == [] and static.report.shapes.second_shape is None
    assert "static: x dim 2 = 16 (pinned by dynamic=False)" in str(static.report)
    fxcompress.save(static, tmp_path / "static.pt2")
    for candidate in (static, fxcompress.load(tmp_path / "static.pt2")):
        with pytest.raises(fxcompress.InputShapeError, match=r"'x' dim 0 has size 3.*pinned by dynamic=False.*dynamic=True"):
            candidate(torch.randn(3, 3, 16, 16))
    batch_only = fxcompress.optimize(model, example, dynamic_shapes={"x": {0: Dim.AUTO}}, report=False)
    assert batch_only.report.shapes.dynamic() == ["x dim 0: [2, inf]"]
    assert run(batch_only, make_inputs(5, None))[0].shape == (10,)
    with pytest.raises(fxcompress.InputShapeError, match=r"'x' dim 2 has size 24.*static in the given dynamic_shapes"):
        run(batch_only, make_inputs(2, 24))


@dataclass(frozen=True)
class BakeViewSizes(Pass):
    """Deliberately wrong: replaces every symbolic size in view/reshape arguments by the example's value."""

    name = "bake_view_sizes"
    lossless = True

    def run(self, gm, ctx):
        baked = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
                sizes = [int(s.meta["val"]) if isinstance(s, torch.fx.Node) else s for s in node.args[1]]
                if sizes != list(node.args[1]):
                    node.args = (node.args[0], sizes)
                    baked.append(node.name)
        return PassResult(changed=bool(baked), rewritten=baked)


def test_shape_baking_pass_is_caught_at_the_second_shape_and_named(captured):
    _, example, gm = captured("encoder")
    with pytest.raises(fxcompress.VerificationError) as info:
        PassManager(["eliminate_identity", BakeViewSizes()]).run(copy.deepcopy(gm), context(example))
    assert info.value.pass_name == "bake_view_sizes"
    assert "second shape (input_ids (2, 12) -> (3, 11))" in str(info.value)


def test_second_shape_inputs_stay_valid_for_the_model(captured):
    _, example, gm = captured("bert")
    manager = PassManager(["eliminate_identity"])
    manager.run(copy.deepcopy(gm), context(example))
    probe = manager.probe.kwargs
    for name in ("input_ids", "attention_mask"):
        assert probe[name].shape != example[name].shape and all(a != b for a, b in zip(probe[name].shape, example[name].shape))
    assert 0 <= int(probe["input_ids"].min()) and int(probe["input_ids"].max()) < 100
    assert set(probe["attention_mask"].unique().tolist()) <= {0, 1} and int(probe["attention_mask"].sum()) > 0


def test_backend_recapture_keeps_the_sequence_length_symbolic():
    """The backend's re-capture and passes on a dynamic Dynamo graph (run eagerly here: Inductor is
    what is slow to compile, and it only sees the graph the passes produced)."""
    from fxcompress.dynamo_backend import optimize_subgraph

    make_model, make_inputs = zoo.FAMILIES["encoder"]
    model = make_model()
    graphs = []

    def passes_without_inductor(gm, example_inputs):
        optimized, kept = optimize_subgraph(gm, example_inputs, [zoo.pass_under_test("fold_bn"), zoo.pass_under_test("int8")])
        graphs.append(optimized)
        return lambda *args: optimized(*[args[i] for i in kept])

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=passes_without_inductor)
    for shape in ((2, 12), (2, 7), (2, 5)):
        inputs = make_inputs(*shape)
        assert fidelity(run(model, inputs), run(compiled, inputs)).max_rel_err <= 2e-2
    torch._dynamo.reset()
    assert len(graphs) == 2  # static first compile, then one dynamic graph for every other length
    (ids,) = [n for n in graphs[1].graph.nodes if n.op == "placeholder"]
    assert isinstance(ids.meta["val"].shape[1], torch.SymInt)
    assert any("int8" in str(n.target) for n in graphs[1].graph.nodes)


def test_cli_captures_dynamic_by_default_and_static_on_request(tmp_path):
    for flags, dynamic in (([], True), (["--static"], False)):
        out = tmp_path / f"model{len(flags)}.pt2"
        assert cli.main(["optimize", "fxcompress.models:resnet_small", "--input-shape", "1,3,16,16", "--passes", "fold_bn",
                         "--out", str(out), *flags]) == 0
        loaded = fxcompress.load(out)
        if dynamic:
            assert loaded(torch.randn(3, 3, 24, 24)).shape == (3, 10)
        else:
            with pytest.raises(fxcompress.InputShapeError, match="dim 0 has size 3"):
                loaded(torch.randn(3, 3, 24, 24))


def test_readme_dynamic_shapes_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Dynamic shapes", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (Dynamic shapes)", "exec"), {})
