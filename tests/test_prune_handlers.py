"""prune_channels' per-op handlers: a user's custom op taught through ``register_channel_rule``, a wrong
handler refused by the rewrite's shape check, and the packed q/k/v layouts of torchvision's attention
(``nn.MultiheadAttention``'s unflatten/unsqueeze/transpose/squeeze + ``select``; Swin's
``[B, L, 3, heads, d]`` permute + ``qkv[0..2]``), all by mask equivalence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from fxcompress.errors import PassConfigError
from fxcompress.passes import ChannelHandler, register_channel_rule
from fxcompress.passes.prune import Builder, PrunedSizes
from fxcompress.report import count_macs
from tests.test_prune_channels import mask_equivalence, outputs, run_pass


@torch.library.custom_op("fxtest_handlers::grouped_rms", mutates_args=())
def grouped_rms(x: torch.Tensor, groups: int) -> torch.Tensor:
    """RMS-normalise each of ``groups`` groups of the last dim (the group size follows the channel count)."""
    parts = x.unflatten(-1, (groups, -1))
    return (parts * torch.rsqrt(parts.square().mean(-1, keepdim=True) + 1e-6)).flatten(-2)


@grouped_rms.register_fake
def _(x, groups):
    torch._check(x.shape[-1] % groups == 0, lambda: f"{x.shape[-1]} channels do not split into {groups} groups")
    return torch.empty_like(x)


class GroupedRMSRule(ChannelHandler):
    """Dims pass through; along the last one whole groups go together; ``groups`` follows the kept channels."""

    def link(self, node, b: Builder, inputs, outputs):
        x, out = node.args[0], outputs[0]
        for d in range(b.ndim(x)):
            b.identity(x, d, out, d)
        channels, width = b.size(x, -1), b.size(x, -1) // node.args[1]
        b.map(out, -1, out, -1, np.arange(channels), np.arange(channels) // width * width)

    def resize(self, node, sizes: PrunedSizes):
        width = sizes.old_shape(node)[-1] // node.args[1]
        node.args = (node.args[0], sizes.new_shape(node)[-1] // width)


class LinksButForgetsToResize(GroupedRMSRule):
    def resize(self, node, sizes):
        pass


@torch.library.custom_op("fxtest_handlers::grouped_rms_unresized", mutates_args=())
def grouped_rms_unresized(x: torch.Tensor, groups: int) -> torch.Tensor:
    return grouped_rms(x, groups)


grouped_rms_unresized.register_fake(lambda x, groups: grouped_rms._abstract_fn(x, groups))


class CustomNet(nn.Module):
    groups = 4

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(6, 12), nn.Linear(6, 8), nn.Linear(12, 3)

    def op(self, x, groups):
        return grouped_rms(x, groups)

    def forward(self, x):
        return self.down(self.op(self.up(x), self.groups)) + self.mid(x).sum(-1, keepdim=True)


class UnresizedNet(CustomNet):
    def op(self, x, groups):
        return grouped_rms_unresized(x, groups)


def test_a_registered_custom_op_is_pruned_through_mask_equivalently():
    register_channel_rule(grouped_rms, GroupedRMSRule())
    x = torch.randn(2, 5, 6)
    error, removed = mask_equivalence(CustomNet(), (x,))
    assert removed > 0 and error < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known op: no "unsupported op" warning
        gm, ctx, before, _, result = run_pass(CustomNet(), (x,), ratio=0.5)
    params = dict(gm.named_parameters())
    assert params["up.weight"].shape == (6, 6) and params["down.weight"].shape == (3, 6)  # two of four groups
    call = next(n for n in gm.graph.nodes if n.target is torch.ops.fxtest_handlers.grouped_rms.default)
    assert call.args[1] == 2  # resize() rewrote the group count
    assert [t.shape for t in outputs(gm, ctx)] == [t.shape for t in before]


def test_a_handler_that_forgets_to_resize_is_refused_with_the_node_named():
    register_channel_rule(torch.ops.fxtest_handlers.grouped_rms_unresized, LinksButForgetsToResize)
    x = torch.randn(2, 5, 6)
    gm, ctx, before, _, result = run_pass(UnresizedNet(), (x,), ratio=0.5)
    refused = [(node, why) for node, why in result.skipped if why.startswith("pruning refused")]
    assert refused and "grouped_rms_unresized" in refused[0][0] and "groups" in refused[0][1]
    params = dict(gm.named_parameters())
    assert params["up.weight"].shape == (12, 6)  # the refused group is kept whole
    assert params["mid.weight"].shape == (4, 6)  # the other group is still pruned
    for e, g in zip(before, outputs(gm, ctx)):
        assert e.shape == g.shape


def test_target_macs_is_met_without_the_refused_groups():
    register_channel_rule(torch.ops.fxtest_handlers.grouped_rms_unresized, LinksButForgetsToResize)
    gm, ctx, _, macs, result = run_pass(UnresizedNet(), (torch.randn(2, 5, 6),), target_macs=0.8)
    assert any(why.startswith("pruning refused") for _, why in result.skipped)
    assert dict(gm.named_parameters())["up.weight"].shape == (12, 6)  # refused: kept whole
    assert result.details[0]["macs_after"] == count_macs(gm, ctx) <= 0.8 * macs  # met by the other group


def test_register_channel_rule_rejects_what_is_not_an_op_or_a_handler():
    with pytest.raises(PassConfigError, match="op overload"):
        register_channel_rule("mylib::op", GroupedRMSRule())
    with pytest.raises(PassConfigError, match="ChannelHandler"):
        register_channel_rule(grouped_rms, lambda node, b, inputs, outputs: None)


class Erfc(nn.Module):
    """``erfc`` is in no hand-kept list: it is elementwise by its ``torch.Tag.pointwise``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.b(torch.erfc(self.a(x)).clamp(max=3.0))


def test_pointwise_tagged_ops_pass_channels():
    error, removed = mask_equivalence(Erfc(), (torch.randn(4, 6),))
    assert removed > 0 and error < 1e-5


class SwinSelectAttention(nn.Module):
    """torchvision's ``shifted_window_attention``: qkv reshaped to [B, L, 3, heads, d], permuted, ``qkv[0..2]``."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class MultiheadAttentionBlock(nn.Module):
    """torchvision's ViT ``EncoderBlock``: ``nn.MultiheadAttention`` (packed in-projection) and an MLP."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.ln, self.attention = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x):
        y = self.ln(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(x)


@pytest.mark.parametrize("batch", [1, 2])
def test_swin_packed_qkv_indexed_by_select_prunes_whole_heads(batch):
    model = nn.Sequential(nn.Linear(8, 16), SwinSelectAttention(), nn.Linear(16, 4))
    x = torch.randn(batch, 5, 8)
    error, removed = mask_equivalence(model, (x,))
    assert removed > 0 and error < 1e-5
    gm, ctx, before, _, result = run_pass(model, (x,), ratio=0.5)
    # two of four heads, each with its q, k and v rows: the packed "3" is never pruned
    assert dict(gm.named_parameters())["1.qkv.weight"].shape[0] == 24
    assert [t.shape for t in outputs(gm, ctx)] == [t.shape for t in before]


@pytest.mark.parametrize("batch", [1, 2])
def test_multihead_attention_select_layout_is_kept_whole_with_the_reason(batch):
    model = nn.Sequential(nn.Linear(8, 16), MultiheadAttentionBlock(), nn.Linear(16, 4))
    x = torch.randn(batch, 5, 8)
    error, removed = mask_equivalence(model, (x,))
    assert removed > 0 and error < 1e-5
    gm, ctx, before, _, result = run_pass(model, (x,), ratio=0.5)
    params = dict(gm.named_parameters())
    assert params["1.mlp.0.weight"].shape[0] == 16
    # the packed dim is taken apart by select and the heads are merged with the symbolic batch: kept,
    # and the summary says so
    assert params["1.attention.in_proj_weight"].shape[0] == 48
    assert any("aten.select" in why and "kept whole" in why for _, why in result.skipped)
    assert [t.shape for t in outputs(gm, ctx)] == [t.shape for t in before]
