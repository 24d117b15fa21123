"""Per-op channel rules for ``prune_channels``: which dims of an op's inputs and outputs are
the same channels (identity), which are related by an index map, and which must stay whole.

Every rule receives ``(node, builder, inputs, outputs)``; any dim of ``inputs``/``outputs`` a
rule neither links nor releases is frozen afterwards. An op without a rule freezes every dim
it touches and is reported by name.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx

from fxcompress.passes._prune_graph import Builder, arg, op_name, tensor_shape
from fxcompress.passes._prune_attention import repeat, repeat_interleave, sdpa
from fxcompress.passes._prune_views import RESHAPES, reshape


def apply_rule(node: fx.Node, b: Builder) -> None:
    if node.target is operator.getitem:
        return  # linked by the rule of the op that produced the tuple
    inputs = [n for n in _flat_nodes(node.args, node.kwargs) if tensor_shape(b.gm, n) is not None]
    outputs = _outputs(node, b)
    if not outputs and not inputs:
        return
    name = op_name(node)
    if name in NO_CHANNEL_EFFECT and not outputs:
        return
    rule = RULES.get(name)
    if rule is None:
        for n in inputs + outputs:
            b.freeze_node(n, f"unsupported op {name} (node {node.name})", unknown=True)
        return
    b.touched.clear()  # what this rule links or releases; the rest of its dims is frozen
    rule(node, b, inputs, outputs)
    b.freeze_untouched(inputs + outputs, name)


def _flat_nodes(args, kwargs) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg((args, kwargs), nodes.append)
    return list(dict.fromkeys(nodes))


def _outputs(node: fx.Node, b: Builder) -> list[fx.Node]:
    if isinstance(node.meta.get("val"), torch.Tensor):
        return [node]
    return [u for u in node.users if u.target is operator.getitem and tensor_shape(b.gm, u) is not None]


def _getitem(node: fx.Node, index: int) -> fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)


# --- elementwise, layout -------------------------------------------------------------------


def pointwise(node, b: Builder, inputs, outputs, out=None):
    """out = f(x, y, ...) with broadcasting: dims aligned from the right are the same channels."""
    out = out or outputs[0]
    for x in inputs:
        for k in range(1, min(b.ndim(x), b.ndim(out)) + 1):
            b.identity(x, -k, out, -k)


def permute(node, b: Builder, inputs, outputs):
    x, out = node.args[0], outputs[0]
    n = b.ndim(x)
    if op_name(node) == "aten.permute":
        order = [d % n for d in node.args[1]]
    else:
        d0, d1 = (node.args[1] % n, node.args[2] % n) if len(node.args) > 2 else (0, 1)
        order = list(range(n))
        order[d0], order[d1] = order[d1], order[d0]
    for out_dim, in_dim in enumerate(order):
        b.identity(x, in_dim, out, out_dim)


def expand(node, b: Builder, inputs, outputs):
    """Kept dims are channels; a dim broadcast from size 1 (``repeat_kv``'s query heads per key/value
    head) holds copies, so it may lose indices with its consumers (the size constant follows)."""
    x, out = node.args[0], outputs[0]
    pointwise(node, b, [x], outputs)
    offset = b.ndim(out) - b.ndim(x)
    for d in range(b.ndim(out)):
        if d < offset or b.size(x, d - offset) == 1:
            b.release(out, d)


def reduction(node, b: Builder, inputs, outputs):
    """Kept dims are channels. Reduced dims stay whole, except for ``sum`` (zeroed channels add
    nothing) and ``mean`` (the pruned model averages over the kept channels, as LayerNorm does:
    RMSNorm's mean of squares)."""
    x, out = node.args[0], outputs[0]
    n = b.ndim(x)
    name = op_name(node)
    if name in POOLING:
        reduced = set(range(2, n)) if n > 2 else set()
        keep_dims = True
    elif name in SOFTMAX:
        reduced, keep_dims = {arg(node, "dim") % n}, True
    else:
        dims = arg(node, "dim")
        reduced = set(range(n)) if dims in (None, []) else {d % n for d in ([dims] if isinstance(dims, int) else dims)}
        keep_dims = bool(arg(node, "keepdim", False))
    out_dim = 0
    for d in range(n):
        if d in reduced:
            out_dim += keep_dims
            if name in ("aten.sum", "aten.mean"):
                b.release(x, d)
            if name == "aten.mean" and b.space(x, d) is not None:
                b.normalized.add(b.space(x, d))
            continue
        b.identity(x, d, out, out_dim)
        out_dim += 1


def cat(node, b: Builder, inputs, outputs):
    tensors, out = arg(node, "tensors"), outputs[0]
    dim = arg(node, "dim", 0) % b.ndim(out)
    offset = 0
    for x in tensors:
        size = b.size(x, dim)
        if not isinstance(size, int):
            return
        for d in range(b.ndim(out)):
            if d == dim:
                b.map(x, d, out, d, np.arange(size), offset + np.arange(size))
            else:
                b.identity(x, d, out, d)
        offset += size


def stack(node, b: Builder, inputs, outputs):
    dim = arg(node, "dim", 0) % b.ndim(outputs[0])
    for x in arg(node, "tensors"):
        for d in range(b.ndim(x)):
            b.identity(x, d, outputs[0], d if d < dim else d + 1)


def split(node, b: Builder, inputs, outputs):
    """Pieces of ``x`` along ``dim``: piece k holds indices [offset_k, offset_k + size_k)."""
    x = node.args[0]
    n = b.ndim(x)
    dim = arg(node, "dim", 0) % n
    for index, size in enumerate(_split_sizes(node, b.size(x, dim))):
        piece = _getitem(node, index)
        offset = sum(_split_sizes(node, b.size(x, dim))[:index])
        if piece is None:
            b.release(x, dim)
            continue
        for d in range(n):
            if d == dim:
                b.map(x, d, piece, d, offset + np.arange(size), np.arange(size))
            else:
                b.identity(x, d, piece, d)


def _split_sizes(node: fx.Node, total: int) -> list[int]:
    name = op_name(node)
    if name == "aten.split_with_sizes":
        return list(node.args[1])
    step = node.args[1] if name == "aten.split" else math.ceil(total / node.args[1])
    return [min(step, total - start) for start in range(0, total, step)]


def unbind(node, b: Builder, inputs, outputs):
    x = node.args[0]
    dim = arg(node, "dim", 0) % b.ndim(x)
    for piece in outputs:
        for d in range(b.ndim(x)):
            if d != dim:
                b.identity(x, d, piece, d if d < dim else d - 1)


def slice_(node, b: Builder, inputs, outputs):
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


def select(node, b: Builder, inputs, outputs):
    x = node.args[0]
    dim = node.args[1] % b.ndim(x)
    for d in range(b.ndim(x)):
        if d != dim:
            b.identity(x, d, outputs[0], d if d < dim else d - 1)


def index(node, b: Builder, inputs, outputs):
    """``x[..., idx, ...]`` with one index tensor: dims before and after it are channels."""
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


# --- layers with parameters -----------------------------------------------------------------


def linear(node, b: Builder, inputs, outputs):
    """out[..., o] = sum_i x[..., i] W[o, i] + bias[o]."""
    x, w, bias, out = node.args[0], node.args[1], arg(node, "bias"), outputs[0]
    b.identity(x, -1, w, 1)
    b.identity(w, 0, out, -1)
    if bias is not None:
        b.identity(bias, 0, out, -1)
    for d in range(b.ndim(x) - 1):
        b.identity(x, d, out, d)


def addmm(node, b: Builder, inputs, outputs):
    bias, x, w, out = node.args[0], node.args[1], node.args[2], outputs[0]
    b.identity(x, 1, w, 0)
    b.identity(w, 1, out, 1)
    b.identity(x, 0, out, 0)
    pointwise(node, b, [bias], outputs)


def matmul(node, b: Builder, inputs, outputs):
    """out[.., n, m] = sum_k a[.., n, k] b[.., k, m]; batch dims broadcast."""
    x, y, out = node.args[0], node.args[1], outputs[0]
    if b.ndim(x) < 2 or b.ndim(y) < 2:
        return
    b.identity(x, -1, y, -2)
    b.identity(x, -2, out, -2)
    b.identity(y, -1, out, -1)
    for t in (x, y):
        for k in range(3, min(b.ndim(t), b.ndim(out)) + 1):
            b.identity(t, -k, out, -k)


def conv(node, b: Builder, inputs, outputs):
    """out[n, o] = sum_{i in group(o)} x[n, i] * W[o, i - first(group(o))] + bias[o]."""
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
        first_out = np.searchsorted(out_group, in_group)
        b.map(x, 1, out, 1, np.arange(c_in), first_out)
        b.map(out, 1, out, 1, np.arange(c_out), np.searchsorted(out_group, out_group))


def batch_norm(node, b: Builder, inputs, outputs):
    x = node.args[0]
    out = outputs[0] if op_name(node) == "aten.batch_norm" else _getitem(node, 0)
    if out is None:
        return
    for d in range(b.ndim(x)):
        b.identity(x, d, out, d)
    for name in ("weight", "bias", "running_mean", "running_var"):
        param = arg(node, name)
        if isinstance(param, fx.Node):
            b.identity(param, 0, out, 1)


def layer_norm(node, b: Builder, inputs, outputs):
    """Normalizing over one channel dim: pruning changes which channels the statistics cover."""
    x, out = node.args[0], outputs[0]
    shape = arg(node, "normalized_shape")
    n = b.ndim(x)
    for d in range(n - len(shape)):
        b.identity(x, d, out, d)
    if len(shape) == 1:
        b.identity(x, -1, out, -1)
        b.normalized.add(b.space(out, -1))
        for name in ("weight", "bias"):
            if isinstance(arg(node, name), fx.Node):
                b.identity(arg(node, name), 0, out, -1)


def group_norm(node, b: Builder, inputs, outputs):
    """Whole groups go together, so every kept group keeps its statistics."""
    x, out = node.args[0], outputs[0]
    groups, channels = arg(node, "num_groups"), b.size(x, 1)
    for d in range(b.ndim(x)):
        b.identity(x, d, out, d)
    group_first = (np.arange(channels) // (channels // groups)) * (channels // groups)
    b.map(out, 1, out, 1, np.arange(channels), group_first)
    for name in ("weight", "bias"):
        if isinstance(arg(node, name), fx.Node):
            b.identity(arg(node, name), 0, out, 1)


def embedding(node, b: Builder, inputs, outputs):
    """The vocabulary (dim 0) stays whole; a table tied to an output projection (LM head) stays whole."""
    w, indices, out = node.args[0], node.args[1], outputs[0]
    if not b.shared_attr(w):
        b.identity(w, 1, out, -1)
    for d in range(b.ndim(indices)):
        b.identity(indices, d, out, d)


def assert_metadata(node, b: Builder, inputs, outputs):
    if arg(node, "size") is None and arg(node, "stride") is None:
        for d in range(b.ndim(node.args[0])):
            b.release(node.args[0], d)


def creation(node, b: Builder, inputs, outputs):
    """Constants built from sizes: their dims stay whole (frozen without a warning); a tensor
    argument only lends its dtype and device."""
    for x in inputs:
        for d in range(b.ndim(x)):
            b.release(x, d)


POINTWISE = """add sub rsub mul div true_divide neg abs pow sqrt rsqrt exp log log1p erf reciprocal square cos sin
relu relu_ relu6 gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid
hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu mish softplus clamp clamp_
clamp_min clamp_max maximum minimum where masked_fill dropout feature_dropout alpha_dropout clone
contiguous alias detach to _to_copy type_as lift_fresh_copy zeros_like ones_like full_like empty_like
eq ne ge gt le lt __and__ __or__ bitwise_not logical_not logical_and logical_or sign add_ mul_ sub_ div_
""".split()
POOLING = {f"aten.{p}" for p in """avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d upsample_nearest2d upsample_bilinear2d
""".split()}
SOFTMAX = {"aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"}
CREATION = {f"aten.{c}" for c in "arange zeros ones full empty new_zeros new_ones new_full new_empty scalar_tensor".split()}
NO_CHANNEL_EFFECT = {"aten.sym_size", "aten.sym_numel", "aten.sym_stride", "aten._assert_scalar"}

RULES = {
    **{f"aten.{p}": pointwise for p in POINTWISE},
    **{r: reshape for r in RESHAPES},
    **{p: reduction for p in POOLING | SOFTMAX},
    **{c: creation for c in CREATION},
    "aten.mean": reduction,
    "aten.sum": reduction,
    "aten.amax": reduction,
    "aten.permute": permute,
    "aten.transpose": permute,
    "aten.t": permute,
    "aten.expand": expand,
    "aten.repeat_interleave": repeat_interleave,
    "aten.repeat": repeat,
    "aten.cat": cat,
    "aten.stack": stack,
    "aten.split": split,
    "aten.split_with_sizes": split,
    "aten.chunk": split,
    "aten.unbind": unbind,
    "aten.slice": slice_,
    "aten.select": select,
    "aten.index": index,
    "aten.linear": linear,
    "aten.addmm": addmm,
    "aten.matmul": matmul,
    "aten.bmm": matmul,
    "aten.mm": matmul,
    "aten.conv1d": conv,
    "aten.conv2d": conv,
    "aten.conv3d": conv,
    "aten.convolution": conv,
    "aten.conv_transpose1d": conv,
    "aten.conv_transpose2d": conv,
    "aten.batch_norm": batch_norm,
    "aten._native_batch_norm_legit_no_training": batch_norm,
    "aten.layer_norm": layer_norm,
    "aten.group_norm": group_norm,
    "aten.embedding": embedding,
    "aten.scaled_dot_product_attention": sdpa,
    "aten._assert_tensor_metadata": assert_metadata,
}
