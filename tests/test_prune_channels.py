"""prune_channels: dependency propagation proven by mask equivalence, plus targets and options.

Mask equivalence: pick units, zero every parameter index they cover in the original graph
(producing rows and biases, BN gamma/beta/statistics, consuming columns), prune exactly those
units from a copy, and compare outputs. Any wrongly coupled index makes them differ.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxcompress import ir
from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.pass_base import PassContext
from fxcompress.passes.prune import analyze, apply_pruning
from fxcompress.passes.prune.importance import choose_units
from fxcompress.passes.prune_channels import PruneChannels, removed_indices
from fxcompress.report import count_macs
from tests import prune_zoo

torch.manual_seed(0)


def randomize_norms(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def ctx_of(inputs) -> PassContext:
    return PassContext.of(inputs)


def outputs(module, ctx: PassContext) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in pytree.tree_leaves(ctx.run(module)) if isinstance(t, torch.Tensor)]


def mask_equivalence(model: nn.Module, inputs, ratio: float = 0.5, seed: int = 0) -> tuple[float, int]:
    """Max |zeroed original - pruned| over all outputs, and how many parameter indices were removed."""
    return graph_mask_equivalence(capture(randomize_norms(model), inputs), ctx_of(inputs), ratio, seed)


def graph_mask_equivalence(gm, ctx: PassContext, ratio: float = 0.5, seed: int = 0, **analyze_options) -> tuple[float, int]:
    """:func:`mask_equivalence` on a captured graph (left unchanged); ``analyze_options`` go to ``analyze``."""
    graph = analyze(gm, **analyze_options)
    rng = np.random.default_rng(seed)
    scores = [rng.random(len(g.units)) for g in graph.groups]
    chosen = choose_units(graph, scores, ratio, "local", 1.0, 1)
    chosen = [c if not g.normalized else c[:0] for g, c in zip(graph.groups, chosen)]  # LN statistics differ
    removed = removed_indices(graph, chosen)
    zeroed = copy.deepcopy(gm)
    n_removed = 0
    for sid, idx in removed.items():
        if sid in graph.param_spaces:
            target, dim = graph.param_spaces[sid]
            with torch.no_grad():
                ir.get_attr(zeroed, target).index_fill_(dim, torch.as_tensor(idx), 0.0)
            n_removed += len(idx)
    pruned = copy.deepcopy(gm)
    apply_pruning(pruned, graph, removed)
    expected, got = outputs(zeroed, ctx), outputs(pruned, ctx)
    assert [t.shape for t in expected] == [t.shape for t in got]
    return max(float((e - g).abs().max()) for e, g in zip(expected, got)), n_removed


# --- coupling patterns ---------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.c(y + self.b(y) * y)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class SplitSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 12, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.a(x)
        p, q, r = y.split([4, 4, 4], 1)
        s, t = y.chunk(2, 1)
        return self.b(p + q * r) + self.c(torch.cat([t, s], 1)) + self.b(y[:, 8:])


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(self.g(self.dw(self.a(x))))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.gn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.GroupNorm(4, 8)
        self.c, self.pool = nn.Conv2d(8, 4, 1), nn.MaxPool2d(2)

    def forward(self, x):
        return self.c(F.dropout(self.pool(F.silu(self.gn(self.bn(self.a(x))))), 0.1, self.training))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.a(x)), 4), 1))


class Functional(nn.Module):
    """Parameters used directly by functional ops, one of them twice (tied)."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(8, 8, 1, 1))

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        y = F.relu(F.conv2d(y, self.w2))
        return F.conv2d(F.conv2d(y, self.w2), self.w1.sum((1, 2, 3), keepdim=True).transpose(0, 1)[:4, :, :, :])


class EmbeddingMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(20, 16), nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, ids):
        return self.fc2(F.gelu(self.fc1(self.emb(ids)))).sum(1)


class Heads(nn.Module):
    """Separate q/k/v projections (HF style) with explicit head views and a broadcast mask."""

    def __init__(self, dim=24, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (m(x).view(b, n, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        mask = torch.zeros(b, 1, 1, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(self.o(y.transpose(1, 2).reshape(b, n, -1)))


PATTERNS = {
    "residual_add_mul": (Residual, lambda: (torch.randn(2, 3, 8, 8),)),
    "cat_offsets": (Concat, lambda: (torch.randn(2, 3, 8, 8),)),
    "split_chunk_slice": (SplitSlice, lambda: (torch.randn(2, 3, 8, 8),)),
    "depthwise_grouped": (Grouped, lambda: (torch.randn(2, 3, 8, 8),)),
    "norms_act_pool_dropout": (Norms, lambda: (torch.randn(2, 3, 8, 8),)),
    "flatten_linear": (FlattenLinear, lambda: (torch.randn(2, 3, 8, 8),)),
    "functional_tied": (Functional, lambda: (torch.randn(2, 3, 8, 8),)),
    "embedding": (EmbeddingMLP, lambda: (torch.randint(0, 20, (2, 5)),)),
    "attention_heads": (Heads, lambda: (torch.randn(2, 5, 24),)),
    "squeeze_excite": (lambda: prune_zoo.SqueezeExcite(8), lambda: (torch.randn(2, 8, 4, 4),)),
    "channel_shuffle": (lambda: prune_zoo.ShuffleBlock(16, 16, 1), lambda: (torch.randn(2, 16, 4, 4),)),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_mask_equivalence_patterns(name):
    factory, inputs = PATTERNS[name]
    error, n_removed = mask_equivalence(factory(), inputs())
    assert n_removed > 0, "the pattern must leave something prunable"
    assert error < 1e-4


@pytest.mark.parametrize("name", sorted(prune_zoo.zoo()))
def test_mask_equivalence_zoo(name):
    factory, inputs = prune_zoo.zoo()[name]
    error, n_removed = mask_equivalence(factory(), inputs())
    assert n_removed > 0
    assert error < 1e-4


# --- the pass: targets, options, outputs ---------------------------------------------------


def run_pass(model, inputs, **options):
    ctx = ctx_of(inputs)
    gm = capture(model.eval(), inputs)
    before = outputs(gm, ctx)
    macs = count_macs(gm, ctx)
    result = PruneChannels(**options).run(gm, ctx)
    return gm, ctx, before, macs, result


def test_ratio_zero_is_identity():
    gm, ctx, before, _, result = run_pass(prune_zoo.ResNetLike((8, 16)), prune_zoo.image(size=16), ratio=0.0)
    assert not result.changed
    for e, g in zip(before, outputs(gm, ctx)):
        assert torch.equal(e, g)


@pytest.mark.parametrize("name", ["resnet", "mobilenet_v2", "inception", "densenet"])
def test_half_ratio_cuts_conv_net_macs_below_035(name):
    factory, inputs = prune_zoo.zoo()[name]
    gm, ctx, before, macs, result = run_pass(factory(), inputs(), ratio=0.5)
    assert count_macs(gm, ctx) <= 0.35 * macs
    assert [t.shape for t in outputs(gm, ctx)] == [t.shape for t in before]


@pytest.mark.parametrize("name", ["squeezenet", "shufflenet_v2", "hf_bert"])
def test_output_shapes_never_change(name):
    factory, inputs = prune_zoo.zoo()[name]
    x = inputs()
    gm, ctx, before, macs, result = run_pass(factory(), x, ratio=0.7, scope="global", max_ratio_per_group=0.8)
    assert result.changed and count_macs(gm, ctx) < macs
    assert [t.shape for t in outputs(gm, ctx)] == [t.shape for t in before]
    bigger = {k: torch.cat([v, v]) for k, v in x.items()} if isinstance(x, dict) else tuple(torch.cat([t, t]) for t in x)
    assert all(t.shape[0] == 4 for t in outputs(gm, ctx_of(bigger)))  # the batch stays dynamic


def test_bert_prunes_whole_heads_and_keeps_hidden_size():
    model = prune_zoo.hf_bert(hidden=32, heads=4)
    gm, ctx, before, _, result = run_pass(model, prune_zoo.tokens(), ratio=0.5)
    query = ir.get_attr(gm, "encoder.layer.0.attention.self.query.weight")
    assert query.shape == (16, 32)  # 2 of 4 heads of 8 features, hidden size 32 kept
    assert ir.get_attr(gm, "encoder.layer.0.attention.output.dense.weight").shape == (32, 16)
    assert [t.shape for t in outputs(gm, ctx)] == [t.shape for t in before]


def test_round_to_keeps_multiples():
    gm, ctx, _, _, result = run_pass(prune_zoo.ResNetLike(widths=(24, 40, 64)), prune_zoo.image(), ratio=0.3, round_to=8)
    assert result.changed
    for name, conv in gm.named_parameters():
        if name.endswith(".0.weight") and conv.ndim == 4 and conv.shape[1] != 3:
            assert conv.shape[0] % 8 == 0, (name, conv.shape)


def test_ignored_layers_untouched():
    model = prune_zoo.ResNetLike()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gm, ctx, _, _, result = run_pass(model, prune_zoo.image(), ratio=0.5, ignore=("layers.2.*", "stem"))
    assert result.changed
    params = dict(gm.named_parameters())
    for name in ("layers.2.conv1.0.weight", "layers.2.conv2.0.weight", "stem.0.weight"):
        assert torch.equal(params[name], original[name])
    assert params["layers.3.conv1.0.weight"].shape[0] < original["layers.3.conv1.0.weight"].shape[0]


@torch.library.custom_op("fxtest_prune::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1).clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class WithUnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.d(F.relu(self.c(mystery(F.relu(self.b(F.relu(self.a(x))))))))


def test_unknown_op_keeps_its_channels_and_warns():
    with pytest.warns(UserWarning, match="fxtest_prune.mystery"):
        gm, ctx, before, _, result = run_pass(WithUnknownOp(), (torch.randn(2, 3, 4, 4),), ratio=0.5)
    params = dict(gm.named_parameters())
    assert params["b.weight"].shape == (8, 4, 1, 1)  # b's output channels feed the unknown op: kept
    assert params["c.weight"].shape == (4, 8, 1, 1)  # c's input comes out of it: kept; c's output pruned
    assert any("fxtest_prune.mystery" in reason for _, reason in result.skipped)
    assert outputs(gm, ctx)[0].shape == before[0].shape


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor", "random"])
def test_importance_criteria(importance):
    gm, ctx, before, macs, result = run_pass(prune_zoo.ResNetLike((8, 16)), prune_zoo.image(size=16), ratio=0.4, importance=importance)
    assert result.changed and count_macs(gm, ctx) < 0.6 * macs
    assert [t.shape for t in outputs(gm, ctx)] == [t.shape for t in before]


def test_l1_removes_the_smallest_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.01, 2.0, 0.02]).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model[2].weight.fill_(0.1)
    gm, *_ = run_pass(model, (torch.randn(1, 3, 2, 2),), ratio=0.5)
    assert torch.allclose(ir.get_attr(gm, "0.weight")[:, 0, 0, 0], torch.tensor([1.0, 2.0]))


def test_target_macs_is_reached():
    gm, ctx, before, macs, result = run_pass(prune_zoo.ResNetLike((8, 16)), prune_zoo.image(size=16), target_macs=0.5)
    after = count_macs(gm, ctx)
    assert after <= 0.5 * macs and after >= 0.35 * macs
    assert result.details[0]["macs_after"] == after


def test_global_scope_respects_max_ratio():
    gm, ctx, before, macs, result = run_pass(prune_zoo.ResNetLike((8, 16)), prune_zoo.image(size=16), ratio=0.5, scope="global", max_ratio_per_group=0.6)
    for d in result.details[1:]:
        assert d["removed_units"] <= int(0.6 * d["units"])
    assert count_macs(gm, ctx) < macs


def test_layernorm_over_pruned_channels_matches_narrow_model():
    """LN statistics over pruned channels are those of the kept channels."""
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 6)
    gm, ctx, _, _, result = run_pass(model, (x,), ratio=0.5)
    keep = [i for i in range(8) if any(torch.equal(model[0].weight[i], r) for r in ir.get_attr(gm, "0.weight"))]
    assert len(keep) == 4
    ln = F.layer_norm(F.linear(x, model[0].weight[keep], model[0].bias[keep]), (4,), model[1].weight[keep], model[1].bias[keep])
    assert torch.allclose(gm(x), F.linear(ln, model[2].weight[:, keep], model[2].bias), atol=1e-5)


def test_pruned_model_saves_loads_and_compiles(tmp_path):
    gm, ctx, *_ = run_pass(prune_zoo.ResNetLike((8, 16)), prune_zoo.image(size=16), ratio=0.5)
    expected = outputs(gm, ctx)[0]
    torch.export.save(torch.export.export(gm, ctx.args, strict=False), tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    assert torch.allclose(outputs(loaded, ctx)[0], expected)
    assert torch.allclose(torch.compile(gm, backend="eager")(*ctx.args), expected)


@pytest.mark.parametrize("options", [
    {"ratio": "half"}, {"ratoi": 0.5}, {"ratio": 0.5, "target_macs": 0.5}, {"ratio": 1.0}, {"target_macs": 0.0}, {"ratio": 0.5, "importance": "l3"},
    {"ratio": 0.5, "scope": "layer"}, {"ratio": 0.5, "round_to": 0}, {"ratio": 0.5, "max_ratio_per_group": 0},
    {"ratio": 0.5, "ignore": (lambda n: True,)},
])
def test_bad_options_raise(options):
    with pytest.raises(PassConfigError):
        PruneChannels(**options)


def test_no_target_means_the_documented_default_ratio():
    assert PruneChannels().ratio == 0.5


def test_runs_under_the_pass_manager_with_verification():
    import fxcompress

    model, inputs = prune_zoo.ResNetLike((8, 16)).eval(), prune_zoo.image(size=16)
    gm = fxcompress.optimize(model, inputs, passes=[PruneChannels(ratio=0.5)], report=False)
    assert gm(*inputs).shape == model(*inputs).shape
    assert sum(p.numel() for p in gm.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
