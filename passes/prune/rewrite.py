"""Physically remove chosen channels: ``W' = W[keep_0, keep_1, ...]`` for every parameter and
buffer with a pruned dim, every size argument rewritten by its op's handler (``resize``: view/reshape/
expand shapes, LayerNorm shapes, GroupNorm and conv group counts, split sizes, slice bounds), then
fresh fake-tensor shapes.

Before any weight is sliced, :func:`refusal` runs the resized graph on fake tensors of the pruned
shapes and compares every channel space with its expected size: a rewrite that would not run (an
indexed dim that lost the index it reads) or would give other shapes is refused with the node and
the reason, and the graph is left as it was.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxcompress import ir
from fxcompress.passes.prune.core import PrunedSizes, handler_for
from fxcompress.passes.prune.graph import ChannelGraph


def pruned_sizes(gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray]) -> PrunedSizes:
    return PrunedSizes(gm, {(graph.spaces[s].node, graph.spaces[s].dim): idx for s, idx in removed.items()})


def _expected(graph: ChannelGraph, removed: dict[int, np.ndarray]) -> dict[tuple[str, int], int]:
    return {(graph.spaces[s].node, graph.spaces[s].dim): graph.spaces[s].size - len(idx) for s, idx in removed.items()}


def _resize_all(gm: fx.GraphModule, sizes: PrunedSizes) -> None:
    for node in gm.graph.nodes:
        handler = handler_for(node.target) if node.op == "call_function" else None
        if handler is not None:
            handler.resize(node, sizes)


def refusal(gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray]) -> tuple[str, str] | None:
    """``(node, reason)`` if removing ``removed`` gives an inconsistent graph, else ``None``; ``gm`` is unchanged."""
    saved = [(n, n.target, n.args, n.kwargs) for n in gm.graph.nodes if n.op == "call_function"]
    sizes = pruned_sizes(gm, graph, removed)
    try:
        _resize_all(gm, sizes)
        return _PrunedShapeCheck(gm, sizes, _expected(graph, removed)).problem()
    finally:
        for node, target, args, kwargs in saved:
            node.target, node.args, node.kwargs = target, args, kwargs


class _PrunedShapeCheck(fx.Interpreter):
    """Runs the resized graph on fake tensors with the pruned parameter shapes; writes no metadata."""

    def __init__(self, gm: fx.GraphModule, sizes: PrunedSizes, expected: dict[tuple[str, int], int]):
        super().__init__(gm)
        self.sizes, self.expected = sizes, expected
        self.fakes = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        self.mode = next(f.fake_mode for f in self.fakes if isinstance(f, torch.Tensor))

    def problem(self) -> tuple[str, str] | None:
        try:
            with self.mode:
                self.run(*self.fakes)
        except _Mismatch as mismatch:
            return mismatch.node, mismatch.reason
        return None

    def run_node(self, n: fx.Node):
        try:
            if n.op == "get_attr" and isinstance(value := self.fetch_attr(n.target), torch.Tensor):
                return torch.empty(self.sizes.new_shape(n), dtype=value.dtype, device=value.device)
            result = super().run_node(n)
        except Exception as error:  # an op's shape rule rejects the pruned inputs
            raise _Mismatch(n.name, f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
        for dim, size in enumerate(result.shape if isinstance(result, torch.Tensor) else ()):
            want = self.expected.get((n.name, dim))
            if want is not None and size != want:
                raise _Mismatch(n.name, f"dim {dim} would have size {size}, the channel analysis expects {want}")
        return result


class _Mismatch(Exception):
    def __init__(self, node: str, reason: str):
        super().__init__(f"{node}: {reason}")  # fx.Interpreter appends the node to the message
        self.node, self.reason = node, reason


def apply_pruning(
    gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray], refresh_meta: bool = True
) -> list[str]:
    """Rewrite ``gm`` in place; returns the parameter/buffer targets that were sliced.

    Raises ``RuntimeError`` (naming the node) for a removal :func:`refusal` would refuse.
    ``refresh_meta=False`` skips the final fake-tensor shape propagation (for throw-away trial copies
    that are only run)."""
    problem = refusal(gm, graph, removed)
    if problem is not None:
        raise RuntimeError(f"prune_channels cannot remove these channels: at {problem[0]}, {problem[1]}")
    sizes = pruned_sizes(gm, graph, removed)
    _resize_all(gm, sizes)
    sliced = _slice_attrs(gm, sizes)
    if refresh_meta:
        refresh_shapes(gm)
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

