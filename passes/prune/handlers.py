"""Channel handlers of elementwise, layout, indexing, reduction and creation ops.

An op that takes a dim apart (``select``, ``unbind``, integer ``index``) leaves that dim unlinked, so it
is frozen; ``split``/``chunk``/``slice``/``cat`` link it by index maps along their real boundaries and
resize their sizes and bounds to the kept channels.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.passes.prune.core import POINTWISE, ChannelHandler, arg, channel_rule, register_channel_rule

aten = torch.ops.aten

# elementwise ops that torch does not tag ``pointwise`` (the tagged ones need no entry)
UNTAGGED_ELEMENTWISE = (
    aten.rsub, aten.hardswish, aten.hardswish_, aten.gelu_, aten.where, aten.masked_fill, aten.dropout,
    aten.feature_dropout, aten.alpha_dropout, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to,
    aten._to_copy, aten.type_as, aten.lift_fresh_copy, aten.zeros_like, aten.ones_like, aten.full_like,
    aten.empty_like, aten.__and__, aten.__or__,
)
for _op in UNTAGGED_ELEMENTWISE:
    register_channel_rule(_op, POINTWISE)


def getitem_user(node: fx.Node, index: int) -> fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)


def permutation(node: fx.Node, ndim: int) -> list[int]:
    """Input dim of each output dim of a permute/transpose/t."""
    if node.target.overloadpacket is aten.permute:
        return [d % ndim for d in node.args[1]]
    d0, d1 = (node.args[1] % ndim, node.args[2] % ndim) if len(node.args) > 2 else (0, 1)
    order = list(range(ndim))
    order[d0], order[d1] = order[d1], order[d0]
    return order


@channel_rule(aten.permute, aten.transpose, aten.t)
class Permute(ChannelHandler):
    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        for out_dim, in_dim in enumerate(permutation(node, b.ndim(x))):
            b.identity(x, in_dim, out, out_dim)


def resize_shape_argument(node: fx.Node, name: str, sizes, first_dim: int = 0) -> None:
    """Write the new size into every int entry (not -1) of a shape argument whose dim shrank."""
    if not isinstance(node.meta.get("val"), torch.Tensor) or not sizes.changed(node):
        return
    new_shape = sizes.new_shape(node)
    entries = list(arg(node, name))
    for i, entry in enumerate(entries):
        if isinstance(entry, int) and entry != -1 and len(sizes.removed_at(node, first_dim + i)):
            entries[i] = int(new_shape[first_dim + i])
    ir.set_call_argument(node, name, entries)


@channel_rule(aten.expand)
class Expand(ChannelHandler):
    """Kept dims are channels; a dim broadcast from size 1 (``repeat_kv``'s query heads per key/value
    head) holds copies, so it may lose indices with its consumers (the size constant follows)."""

    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        POINTWISE.link(node, b, [x], outputs)
        offset = b.ndim(out) - b.ndim(x)
        for d in range(b.ndim(out)):
            if d < offset or b.size(x, d - offset) == 1:
                b.release(out, d)

    def resize(self, node, sizes):
        resize_shape_argument(node, "size", sizes)


class Reduction(ChannelHandler):
    """Kept dims are channels; reduced dims stay whole (``sum``/``mean`` below release them)."""

    releases = False  # zeroed channels add nothing to a sum
    normalizes = False  # the pruned model averages over the kept channels (as LayerNorm does: RMSNorm)

    def reduced(self, node: fx.Node, ndim: int) -> tuple[set[int], bool]:
        """The reduced dims and whether they are kept (size 1) in the output."""
        dims = arg(node, "dim")
        reduced = set(range(ndim)) if dims in (None, []) else {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}
        return reduced, bool(arg(node, "keepdim", False))

    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        reduced, keep_dims = self.reduced(node, b.ndim(x))
        out_dim = 0
        for d in range(b.ndim(x)):
            if d not in reduced:
                b.identity(x, d, out, out_dim)
                out_dim += 1
                continue
            out_dim += keep_dims
            if self.releases:
                b.release(x, d)
            if self.normalizes and b.space(x, d) is not None:
                b.normalized.add(b.space(x, d))


@channel_rule(aten.sum)
class Sum(Reduction):
    releases = True


@channel_rule(aten.mean)
class Mean(Reduction):
    releases = normalizes = True


channel_rule(aten.amax)(Reduction)


@channel_rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
class Softmax(Reduction):
    def reduced(self, node, ndim):
        return {arg(node, "dim") % ndim}, True


@channel_rule(*(getattr(aten, p) for p in """avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d upsample_nearest2d upsample_bilinear2d""".split()))
class Pooling(Reduction):
    """Windows over the spatial dims (2..): channels and batch pass through."""

    def reduced(self, node, ndim):
        return (set(range(2, ndim)) if ndim > 2 else set()), True


@channel_rule(aten.cat)
class Cat(ChannelHandler):
    """Input k holds output indices [offset_k, offset_k + size_k); the output's channels are the union of
    the inputs' (DenseNet's features, Inception's branches), so each input is pruned at its own ratio."""

    def link(self, node, b, inputs, outputs):
        tensors, out = arg(node, "tensors"), outputs[0]
        dim = arg(node, "dim", 0) % b.ndim(out)
        for x in tensors:  # the other dims are the same channels in every input, whatever the cat dim's sizes
            for d in range(b.ndim(out)):
                if d != dim:
                    b.identity(x, d, out, d)
        sizes = [b.size(x, dim) for x in tensors]
        if not all(isinstance(size, int) for size in sizes):
            return  # a symbolic offset (tokens of a dynamic image): the cat dim stays whole
        for x, offset, size in zip(tensors, np.cumsum([0] + sizes[:-1]), sizes):
            b.map(x, dim, out, dim, np.arange(size), offset + np.arange(size))
        b.union_of_inputs(out, dim)


@channel_rule(aten.stack)
class Stack(ChannelHandler):
    def link(self, node, b, inputs, outputs):
        dim = arg(node, "dim", 0) % b.ndim(outputs[0])
        for x in arg(node, "tensors"):
            for d in range(b.ndim(x)):
                b.identity(x, d, outputs[0], d if d < dim else d + 1)


def split_sizes(node: fx.Node, total: int) -> list[int]:
    packet = node.target.overloadpacket
    if packet is aten.split_with_sizes:
        return list(node.args[1])
    step = node.args[1] if packet is aten.split else math.ceil(total / node.args[1])
    return [min(step, total - start) for start in range(0, total, step)]


def removed_along_dim(node: fx.Node, sizes) -> tuple[fx.Node, int, np.ndarray]:
    """(input, dim, removed input indices along the op's ``dim``) for split/slice."""
    x = node.args[0]
    dim = arg(node, "dim", 0) % len(sizes.old_shape(x))
    return x, dim, sizes.removed_at(x, dim)


@channel_rule(aten.split, aten.split_with_sizes, aten.chunk)
class Split(ChannelHandler):
    """Pieces of ``x`` along ``dim``: piece k holds indices [offset_k, offset_k + size_k)."""

    def link(self, node, b, inputs, outputs):
        x = node.args[0]
        n = b.ndim(x)
        dim = arg(node, "dim", 0) % n
        pieces = split_sizes(node, b.size(x, dim))
        for index, (offset, size) in enumerate(zip(np.cumsum([0] + pieces), pieces)):
            piece = getitem_user(node, index)
            if piece is None:
                b.release(x, dim)
                continue
            for d in range(n):
                if d == dim:
                    b.map(x, d, piece, d, offset + np.arange(size), np.arange(size))
                else:
                    b.identity(x, d, piece, d)

    def resize(self, node, sizes):
        x, dim, drop = removed_along_dim(node, sizes)
        if not len(drop):
            return
        old = split_sizes(node, sizes.old_shape(x)[dim])
        starts = np.cumsum([0] + old)
        new = [int(n - np.count_nonzero((drop >= a) & (drop < a + n))) for a, n in zip(starts, old)]
        node.target = aten.split_with_sizes.default
        node.args, node.kwargs = (x, new, dim), {}


@channel_rule(aten.slice)
class Slice(ChannelHandler):
    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        n = b.ndim(x)
        dim, step = arg(node, "dim", 0) % n, arg(node, "step", 1)
        size = b.size(x, dim)
        for d in range(n):
            if d != dim:
                b.identity(x, d, out, d)
            elif isinstance(size, int) and step == 1 and all(isinstance(arg(node, k), int | None) for k in ("start", "end")):
                start, end, _ = slice(arg(node, "start"), arg(node, "end")).indices(size)
                b.map(x, d, out, d, np.arange(start, end), np.arange(end - start))

    def resize(self, node, sizes):
        x, dim, drop = removed_along_dim(node, sizes)
        if not len(drop):
            return
        start, end, _ = slice(arg(node, "start"), arg(node, "end")).indices(sizes.old_shape(x)[dim])
        ir.set_call_argument(node, "start", int(start - np.count_nonzero(drop < start)))
        ir.set_call_argument(node, "end", int(end - np.count_nonzero(drop < end)))


@channel_rule(aten.select, aten.unbind)
class TakeApart(ChannelHandler):
    """``select``/``unbind`` index a dim: the other dims are channels; the indexed one stays whole."""

    def link(self, node, b, inputs, outputs):
        x = node.args[0]
        dim = arg(node, "dim", 0) % b.ndim(x)
        for piece in outputs:
            for d in range(b.ndim(x)):
                if d != dim:
                    b.identity(x, d, piece, d if d < dim else d - 1)


@channel_rule(aten.index)
class Index(ChannelHandler):
    """``x[..., idx, ...]`` with one index tensor: dims before and after it are channels; the indexed
    dim stays whole."""

    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        indices = node.args[1]
        positions = [p for p, i in enumerate(indices) if i is not None]
        if len(positions) != 1:
            return
        p = positions[0]
        shift = b.ndim(indices[p]) - 1
        for d in range(b.ndim(x)):
            if d < p:
                b.identity(x, d, out, d)
            elif d > p:
                b.identity(x, d, out, d + shift)


@channel_rule(aten.roll, aten.flip)
class AlongDims(ChannelHandler):
    """``roll``/``flip`` move indices within their ``dims`` (which stay whole); the other dims pass."""

    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        moved = arg(node, "dims")
        moved = {d % b.ndim(x) for d in ([moved] if isinstance(moved, int) else moved)} if moved else set(range(b.ndim(x)))
        for d in range(b.ndim(x)):
            if d not in moved:
                b.identity(x, d, out, d)


@channel_rule(aten.constant_pad_nd, aten.pad)
class Pad(ChannelHandler):
    """Padding the trailing dims: the padded dims stay whole, the others pass (``pad`` lists the last dim first)."""

    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        pad = list(arg(node, "pad"))
        padded = {b.ndim(x) - 1 - i // 2 for i, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
        for d in range(b.ndim(x)):
            if d not in padded:
                b.identity(x, d, out, d)


@channel_rule(aten._assert_tensor_metadata)
class AssertMetadata(ChannelHandler):
    def link(self, node, b, inputs, outputs):
        if arg(node, "size") is None and arg(node, "stride") is None:
            for d in range(b.ndim(node.args[0])):
                b.release(node.args[0], d)


@channel_rule(*(getattr(aten, c) for c in "arange zeros ones full empty new_zeros new_ones new_full new_empty scalar_tensor".split()))
class Creation(ChannelHandler):
    """Constants built from sizes: their dims stay whole (frozen without a warning); a tensor
    argument only lends its dtype and device."""

    def link(self, node, b, inputs, outputs):
        for x in inputs:
            for d in range(b.ndim(x)):
                b.release(x, d)

