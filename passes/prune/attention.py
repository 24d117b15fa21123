"""Channel handlers of attention: heads of ``scaled_dot_product_attention`` and the ways key/value heads
are shared by query heads (grouped-query attention): ``repeat_interleave``, ``repeat`` and
``enable_gqa``; ``repeat_kv``'s expand + reshape is covered by the expand and view handlers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from fxcompress.passes.prune.core import ChannelHandler, arg, channel_rule

aten = torch.ops.aten


@channel_rule(aten.repeat_interleave)
class RepeatInterleave(ChannelHandler):
    """``out[.., j, ..] = x[.., j // r, ..]`` (key/value heads repeated for their query heads)."""

    def link(self, node, b, inputs, outputs):
        x, out, repeats = node.args[0], outputs[0], arg(node, "repeats")
        dim = arg(node, "dim")
        if not isinstance(repeats, int) or dim is None:
            return
        dim %= b.ndim(x)
        for d in range(b.ndim(x)):
            if d != dim:
                b.identity(x, d, out, d)
            elif isinstance(b.size(out, d), int):
                b.map(out, d, x, d, np.arange(b.size(out, d)), np.arange(b.size(out, d)) // repeats)


@channel_rule(aten.repeat)
class Repeat(ChannelHandler):
    """``x.repeat(r_0, .., r_n)`` tiles: ``out[.., j, ..] = x[.., j % size, ..]``."""

    def link(self, node, b, inputs, outputs):
        x, out, repeats = node.args[0], outputs[0], list(node.args[1])
        offset = len(repeats) - b.ndim(x)
        for d in range(b.ndim(x)):
            size, times = b.size(x, d), repeats[d + offset]
            if times == 1:
                b.identity(x, d, out, d + offset)
            elif isinstance(size, int) and isinstance(times, int):
                b.map(out, d + offset, x, d, np.arange(size * times), np.arange(size * times) % size)


@channel_rule(aten.scaled_dot_product_attention)
class ScaledDotProductAttention(ChannelHandler):
    """out[.., h, l, e] = softmax(q[.., h, l, :] k[.., h, :, :]^T * scale + mask) v[.., h, :, e].

    Heads are channels of q, k, v and out alike. The q/k feature dim is a channel only with an
    explicit scale (the default scale depends on its size).
    """

    def link(self, node, b, inputs, outputs):
        q, k, v, out = node.args[0], node.args[1], node.args[2], outputs[0]
        mask = arg(node, "attn_mask")
        for t in (q, k, v):
            for j in range(3, min(b.ndim(t), b.ndim(out)) + 1):
                b.identity(t, -j, out, -j)
        heads, kv_heads = b.size(q, -3) if b.ndim(q) > 2 else None, b.size(k, -3) if b.ndim(k) > 2 else None
        if arg(node, "enable_gqa", False) and isinstance(heads, int) and isinstance(kv_heads, int) and heads != kv_heads:
            # grouped-query attention: query head h reads key/value head h // (heads / kv_heads)
            b.identity(k, -3, v, -3)
            b.map(q, -3, k, -3, np.arange(heads), np.arange(heads) // (heads // kv_heads))
        b.identity(q, -2, out, -2)
        b.identity(k, -2, v, -2)
        b.identity(v, -1, out, -1)
        if arg(node, "scale") is not None:
            b.identity(q, -1, k, -1)
        if isinstance(mask, fx.Node):  # broadcast against (.., h, l, s)
            b.identity(mask, -1, k, -2)
            for j in range(2, min(b.ndim(mask), b.ndim(out)) + 1):
                b.identity(mask, -j, out, -j)
