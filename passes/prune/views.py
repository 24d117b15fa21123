"""The view/reshape/flatten/unflatten/squeeze/unsqueeze handler.

Input and output dims are matched in blocks of equal (symbolic) products; a dim split into factors,
or factors merged into one dim, is linked through one *carrier* factor: merged index ``j = (.., c, ..)``
in row-major order maps to carrier index ``c``; the other factors stay whole. The carrier is the
outermost factor (heads of ``view(b, s, heads, head_dim)``), the one already carrying channels on a
merge, the largest for a channel shuffle, and never one whose class the analysis found frozen (a
packed ``[.., 3, heads, d]`` dim taken apart by ``select``/``unbind``): :func:`graph.analyze` then
links again with that factor avoided.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import sympy
import torch
import torch.fx as fx

from fxcompress.passes.prune.core import Builder, ChannelHandler, arg, channel_rule, tensor_shape
from fxcompress.passes.prune.handlers import permutation, resize_shape_argument

aten = torch.ops.aten
RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze)
PERMUTES = (aten.permute, aten.transpose)
SAME_LAYOUT = (aten.contiguous, aten.clone)


@channel_rule(*RESHAPES)
class Reshape(ChannelHandler):
    def link(self, node, b, inputs, outputs):
        x, out = node.args[0], outputs[0]
        in_shape, out_shape = tensor_shape(b.gm, x), tensor_shape(b.gm, out)
        for in_dims, out_dims in _blocks(in_shape, out_shape):
            if len(in_dims) == 1 and len(out_dims) == 1:
                b.identity(x, in_dims[0], out, out_dims[0])
            elif len(in_dims) == 1 or len(out_dims) == 1:
                _link_factors(node, b, x, in_dims, out, out_dims)

    def resize(self, node, sizes):
        packet = node.target.overloadpacket
        if packet is aten.unflatten:
            resize_shape_argument(node, "sizes", sizes, first_dim=arg(node, "dim") % len(sizes.old_shape(node.args[0])))
        elif packet in (aten.view, aten.reshape, aten._unsafe_view):
            names = [a.name for a in node.target._schema.arguments]
            resize_shape_argument(node, "size" if "size" in names else "shape", sizes)


def _link_factors(node, b: Builder, x, in_dims, out, out_dims):
    whole, whole_dims, parts, part_dims = (x, in_dims, out, out_dims) if len(in_dims) == 1 else (out, out_dims, x, in_dims)
    sizes = [tensor_shape(b.gm, parts)[d] for d in part_dims]
    if not all(isinstance(s, int) for s in sizes):
        return
    carrier = _carrier(node, b, parts, part_dims, sizes, splitting=whole is x)
    stride = math.prod(sizes[carrier + 1 :])
    merged = np.arange(math.prod(sizes))
    b.map(whole, whole_dims[0], parts, part_dims[carrier], merged, (merged // stride) % sizes[carrier])
    carrier_space = b.space(parts, part_dims[carrier])
    b.carriers.add(carrier_space)
    b.carrier_choices[node.name] = (carrier, carrier_space, b.space(whole, whole_dims[0]))


def _carrier(node, b: Builder, parts, part_dims, sizes, splitting: bool) -> int:
    """Which factor carries the channels of a split or merged dim (see the module docstring)."""
    candidates = [i for i, s in enumerate(sizes) if s > 1]
    candidates = [i for i in candidates if i not in b.avoid_carriers.get(node.name, ())] or candidates
    if not splitting:
        if b.query_heads:
            expanded = [i for i in candidates if _broadcast_factor(b, parts, part_dims[i])]
            if expanded:
                return expanded[0]
        flagged = [i for i in candidates if b.space(parts, part_dims[i]) in b.carriers]
        return flagged[0] if flagged else candidates[0]
    if _merged_back_reordered(node, part_dims):
        return max(candidates, key=lambda i: sizes[i])
    return candidates[0]


def _broadcast_factor(b: Builder, parts: fx.Node, dim: int) -> bool:
    """``dim`` of ``parts`` is an ``expand`` of a size-1 dim: the query heads that share one key/value head
    (``repeat_kv``'s ``x[:, :, None].expand(b, kv, g, s, d)``)."""
    if not (isinstance(parts, fx.Node) and parts.target is aten.expand.default):
        return False
    source = tensor_shape(b.gm, parts.args[0])
    offset = len(tensor_shape(b.gm, parts)) - len(source)
    return dim >= offset and source[dim - offset] == 1


def _merged_back_reordered(node: fx.Node, dims: list[int]) -> bool:
    """A channel shuffle: the split factors are permuted and merged back by a reshape (single users)."""
    position = list(dims)
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        packet = getattr(user.target, "overloadpacket", None)
        if packet in PERMUTES:
            order = permutation(user, len(user.meta["val"].shape))
            position = [order.index(p) for p in position]
        elif packet in RESHAPES:
            return position != sorted(position)
        elif packet not in SAME_LAYOUT:
            return False
        current = user
    return False


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _whole_multiple(ratio) -> bool:
    """``ratio`` is an integer > 1 for every value of the (positive integer) size symbols in it."""
    return ratio != 1 and bool(ratio.is_integer) and bool(ratio.is_positive)


def _blocks(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Minimal runs of input and output dims (size-1 dims dropped) with equal products."""
    return _blocks_of(tuple(_expr(s) for s in in_shape), tuple(_expr(s) for s in out_shape))


@functools.lru_cache(maxsize=4096)
def _blocks_of(in_shape: tuple, out_shape: tuple) -> list[tuple[list[int], list[int]]]:
    """:func:`_blocks` on sympy sizes, cached: transformer layers repeat their reshapes, and the analysis
    re-links when a carrier is frozen."""
    ins = [d for d, s in enumerate(in_shape) if s != 1]
    outs = [d for d, s in enumerate(out_shape) if s != 1]
    blocks, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        bi, bj = [ins[i]], [outs[j]]
        pi, pj = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while not _equal(pi, pj):
            ratio = pj / pi
            if _whole_multiple(ratio) and i < len(ins):
                pi, i = pi * in_shape[ins[i]], i + 1
                bi.append(ins[i - 1])
            elif _whole_multiple(1 / ratio) and j < len(outs):
                pj, j = pj * out_shape[outs[j]], j + 1
                bj.append(outs[j - 1])
            else:
                return blocks
        blocks.append((bi, bj))
    return blocks


def _equal(a, b) -> bool:
    """Sizes are products of symbols and integers: canonical in sympy up to expansion (``simplify`` cost
    seconds per windowed-attention reshape). A missed equality only freezes a dim."""
    difference = a - b
    return difference == 0 or (bool(difference.free_symbols) and sympy.expand(difference) == 0)
