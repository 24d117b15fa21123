"""Channel rules for view/reshape/flatten/unflatten/squeeze/unsqueeze (``prune_channels``).

Input and output dims are matched in blocks of equal (symbolic) products; a dim split into
factors, or factors merged into one dim, is linked through one *carrier* factor.
"""

from __future__ import annotations

import math

import numpy as np
import sympy
import torch
import torch.fx as fx

from fxcompress.passes._prune_graph import Builder, arg, op_name, tensor_shape

RESHAPES = {f"aten.{r}" for r in "view reshape _unsafe_view flatten unflatten squeeze unsqueeze".split()}


def reshape(node, b: Builder, inputs, outputs):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: match blocks of dims with equal products.

    A dim split into factors (or factors merged into a dim) is linked to one *carrier* factor:
    merged index j = (.., c, ..) in row-major order maps to carrier index c. The other factors
    stay whole.
    """
    x, out = node.args[0], outputs[0]
    in_shape, out_shape = tensor_shape(b.gm, x), tensor_shape(b.gm, out)
    for in_dims, out_dims in _blocks(in_shape, out_shape):
        if len(in_dims) == 1 and len(out_dims) == 1:
            b.identity(x, in_dims[0], out, out_dims[0])
        elif len(in_dims) == 1 or len(out_dims) == 1:
            _link_factors(node, b, x, in_dims, out, out_dims)


def _link_factors(node, b: Builder, x, in_dims, out, out_dims):
    whole, whole_dims, parts, part_dims = (x, in_dims, out, out_dims) if len(in_dims) == 1 else (out, out_dims, x, in_dims)
    sizes = [tensor_shape(b.gm, parts)[d] for d in part_dims]
    if not all(isinstance(s, int) for s in sizes):
        return
    carrier = _carrier(node, b, parts, part_dims, sizes, splitting=whole is x)
    stride = math.prod(sizes[carrier + 1 :])
    merged = np.arange(math.prod(sizes))
    b.map(whole, whole_dims[0], parts, part_dims[carrier], merged, (merged // stride) % sizes[carrier])
    b.carriers.add(b.space(parts, part_dims[carrier]))


def _carrier(node, b: Builder, parts, part_dims, sizes, splitting: bool) -> int:
    """Which factor carries the channels of a split or merged dim.

    Merge: the factor already carrying channels, else the outermost. Split: the outermost
    factor that a later ``unbind``/``select`` does not take apart (packed q/k/v), except for a
    channel shuffle (factors merged back in another order), where it is the largest factor.
    """
    candidates = [i for i, s in enumerate(sizes) if s > 1]
    if not splitting:
        flagged = [i for i in candidates if b.space(parts, part_dims[i]) in b.carriers]
        return flagged[0] if flagged else candidates[0]
    end, position = _follow_permutes(node, part_dims)
    name = op_name(end) if end is not None else ""
    if name in RESHAPES and position != sorted(position):
        return max(candidates, key=lambda i: sizes[i])
    if name in ("aten.unbind", "aten.select"):
        taken = arg(end, "dim", 0) % len(tensor_shape_of(end.args[0]))
        candidates = [i for i in candidates if position[i] != taken] or candidates
    return candidates[0]


def _follow_permutes(node: fx.Node, dims: list[int]) -> tuple[fx.Node | None, list[int]]:
    """Follow a single-user chain of permutes; the op it ends at and where ``dims`` went."""
    position = list(dims)
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        name = op_name(user)
        if name in ("aten.transpose", "aten.permute"):
            n = len(tensor_shape_of(user))
            order = list(range(n))
            if name == "aten.permute":
                order = [d % n for d in user.args[1]]
            else:
                d0, d1 = user.args[1] % n, user.args[2] % n
                order[d0], order[d1] = order[d1], order[d0]
            position = [order.index(p) for p in position]
        elif name not in ("aten.contiguous", "aten.clone"):
            return user, position
        current = user
    return None, position


def tensor_shape_of(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _whole_multiple(ratio) -> bool:
    """``ratio`` is an integer > 1 for every value of the (positive integer) size symbols in it."""
    return ratio != 1 and bool(ratio.is_integer) and bool(ratio.is_positive)


def _blocks(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Minimal runs of input and output dims (size-1 dims dropped) with equal products."""
    ins = [d for d, s in enumerate(in_shape) if not (isinstance(s, int) and s == 1)]
    outs = [d for d, s in enumerate(out_shape) if not (isinstance(s, int) and s == 1)]
    blocks, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        bi, bj = [ins[i]], [outs[j]]
        pi, pj = _expr(in_shape[ins[i]]), _expr(out_shape[outs[j]])
        i, j = i + 1, j + 1
        while sympy.simplify(pi - pj) != 0:
            ratio = sympy.simplify(pj / pi)
            if _whole_multiple(ratio) and i < len(ins):
                pi, i = pi * _expr(in_shape[ins[i]]), i + 1
                bi.append(ins[i - 1])
            elif _whole_multiple(1 / ratio) and j < len(outs):
                pj, j = pj * _expr(out_shape[outs[j]]), j + 1
                bj.append(outs[j - 1])
            else:
                return blocks
        blocks.append((bi, bj))
    return blocks
