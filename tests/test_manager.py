import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress import ir
from fxcompress.pass_base import Pass, PassResult
from fxcompress.registry import make_pass
from zoo import ZOO


@dataclass(frozen=True)
class PerturbWeight(Pass):
    """A deliberately broken pass: claims to be lossless but changes the first conv weight."""

    name = "perturb_weight"
    lossless = True
    claim_changed: bool = True

    def run(self, gm, ctx):
        conv = next(n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
        with torch.no_grad():
            ir.get_attr(gm, conv.args[1].target).mul_(1.5)
        return PassResult(changed=self.claim_changed, rewritten=[conv.name])


@dataclass(frozen=True)
class ChangeOutputShape(Pass):
    name = "change_output_shape"
    lossless = False

    def run(self, gm, ctx):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        (flat,) = output.args
        first = flat[0]
        with gm.graph.inserting_before(output):
            sliced = gm.graph.call_function(torch.ops.aten.slice.Tensor, (first, 1, 0, 1))
        output.args = ((sliced, *flat[1:]),)
        gm.recompile()
        return PassResult(changed=True)


@dataclass(frozen=True)
class DropReluOnly(Pass):
    """Rewrites and reports; leaves the dead node and the recompile to the manager."""

    name = "drop_relu_only"
    lossless = False
    postcondition_holds: bool = True

    def run(self, gm, ctx):
        relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
        relu.replace_all_uses_with(relu.args[0])
        return PassResult(rewritten=[relu.name])

    def requires(self, gm):
        assert any(n.target is torch.ops.aten.relu.default for n in gm.graph.nodes), "no relu to drop"

    def ensures(self, gm):
        assert self.postcondition_holds, "the postcondition does not hold"


def model_and_inputs():
    make_model, make_inputs = ZOO["plain_cnn"]
    return make_model(), make_inputs()


def test_verification_names_broken_pass_and_first_diverging_node():
    model, inputs = model_and_inputs()
    with pytest.raises(fxcompress.VerificationError) as info:
        fxcompress.optimize(model, inputs, passes=["fold_bn", PerturbWeight()], report=False)
    err = info.value
    assert err.pass_name == "perturb_weight"
    assert err.node == "conv2d"
    assert "perturb_weight" in str(err) and "conv2d" in str(err)


@dataclass(frozen=True)
class ReplaceWeight(Pass):
    """Broken like PerturbWeight, but the way passes write: a new tensor replaces the weight."""

    name = "replace_weight"
    lossless = True

    def run(self, gm, ctx):
        conv = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)][1]
        ir.set_attr(gm, conv.args[1].target, ir.get_attr(gm, conv.args[1].target) * 1.5)
        return PassResult(changed=True, rewritten=[conv.name])


def test_snapshot_shares_weights_and_replays_to_the_first_diverging_node():
    from fxcompress.verify import GraphSnapshot

    model, inputs = model_and_inputs()
    gm = fxcompress.capture(model, inputs)
    snapshot = GraphSnapshot.of(gm)
    assert {id(t) for t in snapshot.module.state_dict(keep_vars=True).values()} <= {id(t) for t in gm.state_dict(keep_vars=True).values()}
    with pytest.raises(fxcompress.VerificationError) as info:
        fxcompress.optimize(model, inputs, passes=[ReplaceWeight()], report=False)
    assert info.value.node == "conv2d_1"


@pytest.mark.parametrize("verify, second_shape", [(True, True), ("full", True), ("fast", False)])
def test_verify_levels(verify, second_shape):
    model, inputs = model_and_inputs()
    out = fxcompress.optimize(model, inputs, passes=["fold_bn"], verify=verify, report=False)
    assert (out.report.shapes.second_shape is not None) == second_shape
    with pytest.raises(fxcompress.VerificationError, match="lossless"):
        fxcompress.optimize(model, inputs, passes=[ReplaceWeight()], verify=verify, report=False)


def test_unknown_verify_level_is_rejected():
    model, inputs = model_and_inputs()
    with pytest.raises(fxcompress.PassConfigError, match="'full'.*'fast'.*False"):
        fxcompress.optimize(model, inputs, verify="quick")


def test_pass_that_claims_unchanged_but_changes_is_caught():
    model, inputs = model_and_inputs()
    with pytest.raises(fxcompress.VerificationError, match="changed=False"):
        fxcompress.optimize(model, inputs, passes=[PerturbWeight(claim_changed=False)], report=False)


def test_output_shape_change_is_caught_even_for_lossy_pass():
    model, inputs = model_and_inputs()
    with pytest.raises(fxcompress.VerificationError, match="output structure/shape/dtype changed"):
        fxcompress.optimize(model, inputs, passes=[ChangeOutputShape()], report=False)


def test_verify_false_skips_value_checks():
    model, inputs = model_and_inputs()
    out = fxcompress.optimize(model, inputs, passes=[PerturbWeight()], verify=False, report=False)
    assert out.report.rows[-1]["max_abs_err"] > 0


@pytest.mark.parametrize("passes", [None, ["fold_bn", PerturbWeight()]])
def test_user_model_is_never_mutated(passes):
    model, inputs = model_and_inputs()
    state = copy.deepcopy(model.state_dict())
    params = [id(p) for p in model.parameters()]
    try:
        fxcompress.optimize(model, inputs, passes=passes, report=False)
    except fxcompress.VerificationError:
        pass
    assert [id(p) for p in model.parameters()] == params
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_unknown_pass_and_bad_options_are_rejected_with_valid_choices():
    model, inputs = model_and_inputs()
    with pytest.raises(fxcompress.UnknownPassError, match="registered passes: .*fold_bn"):
        fxcompress.optimize(model, inputs, passes=["fold_batchnorm"])
    with pytest.raises(fxcompress.PassConfigError, match="no option"):
        make_pass("fold_bn", aggressive=True)
    with pytest.raises(fxcompress.PassConfigError, match="a name or a Pass object"):
        make_pass(42)


def test_pass_configs_are_plain_data():
    a, b = make_pass("fold_bn"), fxcompress.passes.FoldBN()
    assert a == b and hash(a) == hash(b)
    assert json.loads(json.dumps(a.config())) == {"pass": "fold_bn"}
    with pytest.raises(Exception):
        a.name = "other"  # frozen


def test_ir_dump_before_and_after_each_pass(tmp_path, monkeypatch):
    model, inputs = model_and_inputs()
    fxcompress.optimize(model, inputs, report=False, dump_dir=tmp_path / "a")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["00_eliminate_identity_after.py", "00_eliminate_identity_before.py", "01_fold_bn_after.py", "01_fold_bn_before.py"]
    assert "batch_norm" in (tmp_path / "a" / "01_fold_bn_before.py").read_text()
    assert "batch_norm" not in (tmp_path / "a" / "01_fold_bn_after.py").read_text()
    monkeypatch.setenv("FXCOMPRESS_DUMP_DIR", str(tmp_path / "env"))
    fxcompress.optimize(model, inputs, passes=["fold_bn"], report=False)
    assert (tmp_path / "env" / "00_fold_bn_after.py").exists()


class RecordingHook(fxcompress.Instrumentation):
    def __init__(self):
        self.events = []

    def on_start(self, gm, ctx, outputs):
        self.events.append("start")

    def before_pass(self, index, pass_, gm):
        self.events.append(f"before:{pass_.name}")

    def after_run(self, index, pass_, gm, result):
        self.events.append(f"after_run:{pass_.name}")

    def after_pass(self, index, pass_, gm, result, outputs):
        self.events.append(f"after:{pass_.name}")

    def after_failure(self, index, pass_, gm, error):
        self.events.append(f"failure:{pass_.name}:{type(error).__name__}")


def test_instrumentation_hooks_fire_in_order_and_on_failure():
    model, inputs = model_and_inputs()
    hook = RecordingHook()
    with pytest.raises(fxcompress.VerificationError):
        fxcompress.optimize(model, inputs, passes=["fold_bn", PerturbWeight()], report=False, instrumentations=[hook])
    assert hook.events == [
        "start", "before:fold_bn", "after_run:fold_bn", "after:fold_bn",
        "before:perturb_weight", "after_run:perturb_weight", "failure:perturb_weight:VerificationError",
    ]


def test_report_has_a_row_per_pass_with_all_fields():
    model, inputs = model_and_inputs()
    out = fxcompress.optimize(model, inputs, report=fxcompress.ReportConfig(warmup=1, repeats=3))
    rows = out.report.rows
    assert [r["stage"] for r in rows] == ["input", "eliminate_identity", "fold_bn"]
    for row in rows:
        for key in ("params", "macs", "flops", "weight_bytes", "latency_ms", "max_abs_err", "cosine", "nodes"):
            assert row[key] is not None, key
    assert rows[0]["macs"] > 0 and rows[0]["flops"] == 2 * rows[0]["macs"]
    assert rows[-1]["pass_time_s"] > 0
    assert rows[-1]["nodes"] < rows[0]["nodes"]
    assert rows[-1]["cosine"] > 0.99999
    assert json.loads(out.report.to_json())["rows"][2]["stage"] == "fold_bn"
    assert "fold_bn" in str(out.report) and "latency ms" in str(out.report)
    assert out.pipeline == [{"pass": "eliminate_identity"}, {"pass": "fold_bn"}]


def test_manager_cleans_up_and_fills_in_changed():
    model, inputs = model_and_inputs()
    gm = fxcompress.capture(model, inputs)
    relus = sum(n.target is torch.ops.aten.relu.default for n in gm.graph.nodes)
    (record,) = fxcompress.PassManager([DropReluOnly()]).run(gm, fxcompress.PassContext(inputs, {}))
    assert record.result.changed is True  # from rewritten=[...]
    assert sum(n.target is torch.ops.aten.relu.default for n in gm.graph.nodes) == relus - 1  # dead relu removed
    assert gm.code.count("aten.relu.default") == relus - 1  # recompiled
    assert fxcompress.PassResult().changed is None


def test_requires_and_ensures_hooks_fail_by_pass_name():
    model, inputs = model_and_inputs()
    gm = fxcompress.capture(model, inputs)
    with pytest.raises(fxcompress.VerificationError, match="drop_relu_only.*ensures.*postcondition does not hold"):
        fxcompress.PassManager([DropReluOnly(postcondition_holds=False)]).run(gm, fxcompress.PassContext(inputs, {}))
    no_relu = fxcompress.capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 4),))
    with pytest.raises(fxcompress.VerificationError, match="requires.*no relu to drop"):
        fxcompress.PassManager([DropReluOnly()]).run(no_relu, fxcompress.PassContext((torch.randn(2, 4),), {}))
