"""Channel handlers of the layers with parameters: linear/matmul, convolution, norms, embedding."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.passes.prune.core import POINTWISE, ChannelHandler, arg, channel_rule, op_name
from fxcompress.passes.prune.handlers import getitem_user

aten = torch.ops.aten


@channel_rule(aten.linear)
class Linear(ChannelHandler):
    """out[..., o] = sum_i x[..., i] W[o, i] + bias[o]."""

    def link(self, node, b, inputs, outputs):
        x, w, bias, out = node.args[0], node.args[1], arg(node, "bias"), outputs[0]
        b.identity(x, -1, w, 1)
        b.identity(w, 0, out, -1)
        if bias is not None:
            b.identity(bias, 0, out, -1)
        for d in range(b.ndim(x) - 1):
            b.identity(x, d, out, d)


@channel_rule(aten.addmm)
class Addmm(ChannelHandler):
    def link(self, node, b, inputs, outputs):
        bias, x, w, out = node.args[0], node.args[1], node.args[2], outputs[0]
        b.identity(x, 1, w, 0)
        b.identity(w, 1, out, 1)
        b.identity(x, 0, out, 0)
        POINTWISE.link(node, b, [bias], outputs)


@channel_rule(aten.matmul, aten.bmm, aten.mm)
class Matmul(ChannelHandler):
    """out[.., n, m] = sum_k a[.., n, k] b[.., k, m]; batch dims broadcast."""

    def link(self, node, b, inputs, outputs):
        x, y, out = node.args[0], node.args[1], outputs[0]
        if b.ndim(x) < 2 or b.ndim(y) < 2:
            return
        b.identity(x, -1, y, -2)
        b.identity(x, -2, out, -2)
        b.identity(y, -1, out, -1)
        for t in (x, y):
            for k in range(3, min(b.ndim(t), b.ndim(out)) + 1):
                b.identity(t, -k, out, -k)


@channel_rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d, aten.conv_transpose2d)
class Conv(ChannelHandler):
    """out[n, o] = sum_{i in group(o)} x[n, i] * W[o, i - first(group(o))] + bias[o]."""

    def link(self, node, b, inputs, outputs):
        x, w, bias, out = node.args[0], node.args[1], arg(node, "bias"), outputs[0]
        transposed = op_name(node).startswith("aten.conv_transpose") or bool(arg(node, "transposed", False))
        groups = arg(node, "groups", 1)
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        b.identity(x, 0, out, 0)
        b.identity(w, out_dim, out, 1)
        if bias is not None:
            b.identity(bias, 0, out, 1)
        if groups == 1:
            b.identity(x, 1, w, in_dim)
        elif not transposed:
            # per group: all its input channels and all its output channels go together
            c_in, c_out = b.size(x, 1), b.size(out, 1)
            in_group, out_group = np.arange(c_in) // (c_in // groups), np.arange(c_out) // (c_out // groups)
            b.map(x, 1, out, 1, np.arange(c_in), np.searchsorted(out_group, in_group))
            b.map(out, 1, out, 1, np.arange(c_out), np.searchsorted(out_group, out_group))

    def resize(self, node, sizes):
        groups = arg(node, "groups", 1)
        if groups > 1:
            channels = sizes.old_shape(node)[1]
            ir.set_call_argument(node, "groups", int(sizes.new_shape(node)[1]) // (channels // groups))


@channel_rule(aten.batch_norm, aten._native_batch_norm_legit_no_training)
class BatchNorm(ChannelHandler):
    def link(self, node, b, inputs, outputs):
        x = node.args[0]
        out = outputs[0] if node.target.overloadpacket is aten.batch_norm else getitem_user(node, 0)
        if out is None:
            return
        for d in range(b.ndim(x)):
            b.identity(x, d, out, d)
        for name in ("weight", "bias", "running_mean", "running_var"):
            param = arg(node, name)
            if isinstance(param, fx.Node):
                b.identity(param, 0, out, 1)


@channel_rule(aten.layer_norm)
class LayerNorm(ChannelHandler):
    """Normalizing over one channel dim: pruning changes which channels the statistics cover."""

    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        shape = arg(node, "normalized_shape")
        for d in range(b.ndim(x) - len(shape)):
            b.identity(x, d, out, d)
        if len(shape) == 1:
            b.identity(x, -1, out, -1)
            b.normalized.add(b.space(out, -1))
            for name in ("weight", "bias"):
                if isinstance(arg(node, name), fx.Node):
                    b.identity(arg(node, name), 0, out, -1)

    def resize(self, node, sizes):
        k = len(arg(node, "normalized_shape"))
        ir.set_call_argument(node, "normalized_shape", [int(s) for s in sizes.new_shape(node)[-k:]])


@channel_rule(aten.group_norm)
class GroupNorm(ChannelHandler):
    """Whole groups go together, so every kept group keeps its statistics."""

    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        groups, channels = arg(node, "num_groups"), b.size(x, 1)
        for d in range(b.ndim(x)):
            b.identity(x, d, out, d)
        group_first = (np.arange(channels) // (channels // groups)) * (channels // groups)
        b.map(out, 1, out, 1, np.arange(channels), group_first)
        for name in ("weight", "bias"):
            if isinstance(arg(node, name), fx.Node):
                b.identity(arg(node, name), 0, out, 1)

    def resize(self, node, sizes):
        channels, groups = sizes.old_shape(node.args[0])[1], arg(node, "num_groups")
        ir.set_call_argument(node, "num_groups", int(sizes.new_shape(node)[1]) // (channels // groups))


@channel_rule(aten.embedding)
class Embedding(ChannelHandler):
    """The vocabulary (dim 0) stays whole; a table tied to an output projection (LM head) stays whole."""

    def link(self, node, b, inputs, outputs):
        w, indices, out = node.args[0], node.args[1], outputs[0]
        if not b.shared_attr(w):
            b.identity(w, 1, out, -1)
        for d in range(b.ndim(indices)):
            b.identity(indices, d, out, d)
