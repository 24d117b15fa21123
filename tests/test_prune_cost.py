"""What keeps ``prune_channels`` linear: the MAC model ``target_macs`` bisects over, the one incremental shape
check whose values become the metadata, and concatenations whose inputs are chosen independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as hint

from fxcompress.passes.prune import analyze, apply_pruning
from fxcompress.shapes import flat_inputs
from fxcompress.passes.prune.core import arg
from fxcompress.passes.prune.importance import choose_units
from fxcompress.passes.prune.macs import MacModel
from fxcompress.passes.prune_channels import removed_indices
from fxcompress.report import count_macs
from tests import prune_zoo
from tests.test_prune_channels import capture, ctx_of, run_pass


def _half_removed(gm):
    graph = analyze(gm)
    scores = [np.random.default_rng(0).random(len(g.units)) for g in graph.groups]
    chosen = choose_units(graph, scores, 0.5, "local", 1.0, 1)
    return graph, removed_indices(graph, chosen)


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "densenet", "hf_bert"])
def test_mac_model_predicts_the_pruned_models_macs(name):
    factory, inputs = prune_zoo.zoo()[name]
    x = inputs()
    gm, ctx = capture(factory().eval(), x), ctx_of(x)
    graph, removed = _half_removed(gm)
    model = MacModel(gm, graph, ctx)
    assert model.exact and model.total == count_macs(gm, ctx)
    apply_pruning(gm, graph, removed)
    assert model.macs(removed) == count_macs(gm, ctx) < model.total


def test_mac_model_shrinks_a_depthwise_convs_groups_with_its_channels():
    # groups == channels: removing channels removes whole groups, as the rewrite does (a fixed groups= failed on meta)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    x = (torch.randn(2, 3, 8, 8),)
    gm, ctx = capture(model, x), ctx_of(x)
    graph, removed = _half_removed(gm)
    mac_model = MacModel(gm, graph, ctx)
    assert mac_model.exact and removed
    predicted = mac_model.macs(removed)  # before the rewrite, as target_macs bisects
    apply_pruning(gm, graph, removed)
    groups = [arg(n, "groups", 1) for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert 1 < max(groups) < 16  # the rewrite shrank the depthwise conv's groups too
    assert predicted == mac_model.macs(removed) == count_macs(gm, ctx) < mac_model.total


class _Shapes(torch.fx.Interpreter):
    def run_node(self, n):
        result = super().run_node(n)
        self.shapes[n.name] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        return result


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_metadata_after_pruning_matches_the_pruned_models_real_shapes(name):
    factory, inputs = prune_zoo.zoo()[name]
    x = inputs()
    gm, ctx = capture(factory().eval(), x), ctx_of(x)
    graph, removed = _half_removed(gm)
    symbolic_before = {n.name: [not isinstance(d, int) for d in n.meta["val"].shape] for n in gm.graph.nodes
                       if isinstance(n.meta.get("val"), torch.Tensor)}
    apply_pruning(gm, graph, removed)
    real = _Shapes(gm)
    real.shapes = {}
    with torch.no_grad():
        real.run(*flat_inputs(gm, ctx.args, ctx.kwargs))
    checked = 0
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and real.shapes.get(node.name) is not None:
            assert [not isinstance(d, int) for d in val.shape] == symbolic_before[node.name], node.name  # still dynamic
            assert [hint(d) for d in val.shape] == list(real.shapes[node.name]), node.name
            checked += 1
    assert checked > 20


def test_each_concatenated_input_is_pruned_at_the_ratio():
    gm, ctx, _, macs, result = run_pass(prune_zoo.DenseNetLike(growth=8), prune_zoo.image(size=16), ratio=0.5)
    grown = [p for name, p in gm.named_parameters() if name.endswith("conv2.weight")]
    assert grown and all(p.shape[0] == 4 for p in grown)  # every layer's new features: 8 -> 4
    assert count_macs(gm, ctx) <= 0.35 * macs


def test_target_macs_on_a_dense_net_is_met_and_reported():
    gm, ctx, _, macs, result = run_pass(prune_zoo.DenseNetLike(growth=8), prune_zoo.image(size=16), target_macs=0.4)
    assert result.details[0]["macs_after"] == count_macs(gm, ctx) <= 0.4 * macs


def test_attributes_added_by_fold_bn_carry_their_pruned_shapes_into_the_next_pass():
    """fold_bn's new biases are sliced by pruning; their meta["val"] must follow, or a later pass that
    propagates shapes (low_rank's new conv stages) sees the unpruned size."""
    import fxcompress
    from fxcompress import ir
    from fxcompress.passes import LowRank, PruneChannels

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    x = torch.randn(4, 1, 8, 8)
    pruned = fxcompress.optimize(model, (x,), passes=["fold_bn", PruneChannels(ratio=0.5)], report=False)
    for node in pruned.graph.nodes:
        if node.op == "get_attr" and isinstance(node.meta.get("val"), torch.Tensor):
            assert tuple(node.meta["val"].shape) == tuple(ir.get_attr(pruned, node.target).shape), node.name
    gm = fxcompress.optimize(model, (x,), passes=["fold_bn", PruneChannels(ratio=0.5), LowRank(rank=0.5)], report=False)
    assert gm.report.results["low_rank"].rewritten and gm(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_inference_batch_norm_shape_rule_matches_the_op_and_refuses_a_wrong_channel_count():
    """The shape check's BatchNorm rule (no decomposition) gives the op's own output shapes and strides, and
    rejects per-channel tensors that lost their match with the input's channels."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxcompress.passes.prune.rewrite import _inference_batch_norm_shapes

    x = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last)
    stats = [torch.rand(6) + 0.5 for _ in range(4)]

    def bn(x, w, b, mean, var):
        return torch.ops.aten._native_batch_norm_legit_no_training.default(x, w, b, mean, var, 0.1, 1e-5)

    node = next(n for n in make_fx(bn)(x, *stats).graph.nodes if n.op == "call_function")
    env = dict(zip([n for n in node.args[:5]], [x, *stats]))
    expected = bn(*[t.to("meta") for t in (x, *stats)])  # what the check's fake run gave (CPU saves no statistics)
    got = _inference_batch_norm_shapes(node, env)
    assert [(t.shape, t.stride()) for t in got] == [(t.shape, t.stride()) for t in expected]
    env[node.args[1]] = torch.rand(4)
    with pytest.raises(RuntimeError, match="weight of shape"):
        _inference_batch_norm_shapes(node, env)


def test_shape_check_refuses_a_batch_norm_whose_statistics_are_not_pruned_with_its_input():
    """A BatchNorm after a channel-pruned conv whose statistics are plain graph constants of the old size
    must be caught by the check (not crash in the rewrite)."""
    from fxcompress.passes.prune import analyze
    from fxcompress.passes.prune.rewrite import check_removal

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 10, 10)
    gm = capture(model, (x,))
    graph, removed = _half_removed(gm)
    assert removed and check_removal(gm, graph, removed).problem is None  # mean/var are pruned with the conv
    bn = next(n for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
    mean_space = next(s for s, (target, dim) in graph.param_spaces.items() if target == bn.args[3].target)
    kept_mean = {s: idx for s, idx in removed.items() if s != mean_space}
    problem = check_removal(gm, graph, kept_mean).problem
    assert problem is not None and problem[0] == bn.name and "running_mean" in problem[1]
