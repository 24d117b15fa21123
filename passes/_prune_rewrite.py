"""Physically remove chosen channels: ``W' = W[keep_0, keep_1, ...]`` for every parameter and
buffer with a pruned dim, every size constant (view/reshape/expand shapes, LayerNorm shapes,
GroupNorm and conv group counts, split sizes, slice bounds) recomputed from the kept indices,
then fresh fake-tensor shapes, checked against the expected size of every channel space.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxcompress import ir
from fxcompress.passes._prune_graph import ChannelGraph, tensor_shape
from fxcompress.passes._prune_graph import arg, op_name
from fxcompress.passes._prune_rules import _split_sizes


class PrunedSizes:
    """Old and new sizes of every channel space, looked up by fx node."""

    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray]):
        self.gm = gm
        self.removed = {(graph.spaces[s].node, graph.spaces[s].dim): idx for s, idx in removed.items() if len(idx)}

    def removed_at(self, node: fx.Node, dim: int) -> np.ndarray:
        shape = tensor_shape(self.gm, node)
        return self.removed.get((node.name, dim % len(shape)), np.empty(0, dtype=np.int64))

    def new_shape(self, node: fx.Node) -> list:
        return [size - len(self.removed_at(node, d)) for d, size in enumerate(tensor_shape(self.gm, node))]

    def changed(self, node: fx.Node) -> bool:
        return any(len(self.removed_at(node, d)) for d in range(len(tensor_shape(self.gm, node))))


def apply_pruning(
    gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray], refresh_meta: bool = True
) -> list[str]:
    """Rewrite ``gm`` in place; returns the parameter/buffer targets that were sliced.

    ``refresh_meta=False`` skips fake-tensor shape propagation and its check (for throw-away
    trial copies that are only run)."""
    sizes = PrunedSizes(gm, graph, removed)
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node) in SIZE_REWRITES:
            SIZE_REWRITES[op_name(node)](node, sizes)
    sliced = _slice_attrs(gm, sizes)
    expected = {(graph.spaces[s].node, graph.spaces[s].dim): graph.spaces[s].size - len(idx) for s, idx in removed.items()}
    if refresh_meta:
        refresh_shapes(gm)
        _check_shapes(gm, expected)
    ir.finalize(gm)
    return sliced


def _slice_attrs(gm: fx.GraphModule, sizes: PrunedSizes) -> list[str]:
    sliced = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in sliced or not sizes.changed(node):
            continue
        value = ir.get_attr(gm, node.target)
        for dim in range(value.ndim):
            drop = sizes.removed_at(node, dim)
            if len(drop):
                keep = np.setdiff1d(np.arange(value.shape[dim]), drop)
                value = value.index_select(dim, torch.as_tensor(keep, device=value.device))
        ir.set_attr(gm, node.target, value.contiguous())
        sliced.append(node.target)
    return sliced


def refresh_shapes(gm: fx.GraphModule) -> None:
    """Re-run fake-tensor propagation from the placeholders' (possibly symbolic) fake inputs."""
    fakes = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next(f.fake_mode for f in fakes if isinstance(f, torch.Tensor))
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)


def _check_shapes(gm: fx.GraphModule, expected: dict[tuple[str, int], int]) -> None:
    for node in gm.graph.nodes:
        shape = tensor_shape(gm, node) or ()
        for dim, size in enumerate(shape):
            want = expected.get((node.name, dim))
            if want is not None and size != want:
                raise RuntimeError(
                    f"prune_channels internal error: {node.name} dim {dim} has size {size} after pruning, "
                    f"expected {want}; please report this model"
                )


# --- size constants ------------------------------------------------------------------------


def _shape_list(node: fx.Node, name: str, sizes: PrunedSizes, first_dim: int = 0) -> None:
    """Write the new size into every int entry (not -1) of a shape argument whose dim shrank."""
    out = node if isinstance(node.meta.get("val"), torch.Tensor) else None
    if out is None or not sizes.changed(out):
        return
    new_shape = sizes.new_shape(out)
    entries = list(arg(node, name))
    for i, entry in enumerate(entries):
        if isinstance(entry, int) and entry != -1 and len(sizes.removed_at(out, first_dim + i)):
            entries[i] = int(new_shape[first_dim + i])
    ir.set_call_argument(node, name, entries)


def _view(node, sizes):
    _shape_list(node, "size" if "size" in _names(node) else "shape", sizes)


def _unflatten(node, sizes):
    _shape_list(node, "sizes", sizes, first_dim=arg(node, "dim") % len(tensor_shape(sizes.gm, node.args[0])) )


def _names(node) -> list[str]:
    return [a.name for a in node.target._schema.arguments]


def _layer_norm(node, sizes):
    k = len(arg(node, "normalized_shape"))
    ir.set_call_argument(node, "normalized_shape", [int(s) for s in sizes.new_shape(node)[-k:]])


def _group_norm(node, sizes):
    channels, groups = tensor_shape(sizes.gm, node.args[0])[1], arg(node, "num_groups")
    ir.set_call_argument(node, "num_groups", int(sizes.new_shape(node)[1]) // (channels // groups))


def _conv_groups(node, sizes):
    groups = arg(node, "groups", 1)
    if groups > 1:
        channels = tensor_shape(sizes.gm, node)[1]
        ir.set_call_argument(node, "groups", int(sizes.new_shape(node)[1]) // (channels // groups))


def _removed_along_dim(node, sizes):
    """(input, dim, removed input indices along the op's ``dim``) for split/slice."""
    x = node.args[0]
    dim = arg(node, "dim", 0) % len(tensor_shape(sizes.gm, x))
    return x, dim, sizes.removed_at(x, dim)


def _split(node, sizes):
    x, dim, drop = _removed_along_dim(node, sizes)
    if not len(drop):
        return
    old = _split_sizes(node, tensor_shape(sizes.gm, x)[dim])
    starts = np.cumsum([0] + old)
    new = [int(n - np.count_nonzero((drop >= a) & (drop < a + n))) for a, n in zip(starts, old)]
    node.target = torch.ops.aten.split_with_sizes.default
    node.args, node.kwargs = (x, new, dim), {}


def _slice(node, sizes):
    x, dim, drop = _removed_along_dim(node, sizes)
    if not len(drop):
        return
    start, end, _ = slice(arg(node, "start"), arg(node, "end")).indices(tensor_shape(sizes.gm, x)[dim])
    ir.set_call_argument(node, "start", int(start - np.count_nonzero(drop < start)))
    ir.set_call_argument(node, "end", int(end - np.count_nonzero(drop < end)))


SIZE_REWRITES = {
    "aten.view": _view,
    "aten.reshape": _view,
    "aten._unsafe_view": _view,
    "aten.expand": _view,
    "aten.unflatten": _unflatten,
    "aten.layer_norm": _layer_norm,
    "aten.group_norm": _group_norm,
    "aten.conv1d": _conv_groups,
    "aten.conv2d": _conv_groups,
    "aten.conv3d": _conv_groups,
    "aten.convolution": _conv_groups,
    "aten.split": _split,
    "aten.split_with_sizes": _split,
    "aten.chunk": _split,
    "aten.slice": _slice,
}
