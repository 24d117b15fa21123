"""Physically remove chosen channels: ``W' = W[keep_0, keep_1, ...]`` for every parameter and
buffer with a pruned dim, every size argument rewritten by its op's handler (``resize``: view/reshape/
expand shapes, LayerNorm shapes, GroupNorm and conv group counts, split sizes, slice bounds), then
fresh fake-tensor shapes (the check's sizes written into the old symbolic fake values: the graph is
propagated once per removal, at the example's sizes).

Before any weight is sliced, :func:`refusal` runs the resized graph on fake tensors of the pruned
shapes and compares every channel space with its expected size: a rewrite that would not run (an
indexed dim that lost the index it reads) or would give other shapes is refused with the node and
the reason, and the graph is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, guarding_hint_or_throw as hint_int
from torch.utils import _pytree as pytree

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


@dataclass
class PruningCheck:
    """The outcome of the shape check of one removal: ``problem`` (``(node, reason)``) or ``None``, and the
    fake value of every node of the pruned graph (its new ``meta["val"]`` when the removal is applied)."""

    problem: tuple[str, str] | None
    values: dict[str, Any]


def check_removal(gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray]) -> PruningCheck:
    """Run the resized graph on fake tensors of the pruned shapes; ``gm`` is left unchanged."""
    saved = [(n, n.target, n.args, n.kwargs) for n in gm.graph.nodes if n.op == "call_function"]
    sizes = pruned_sizes(gm, graph, removed)
    try:
        _resize_all(gm, sizes)
        return _PrunedShapeCheck(gm, sizes, _expected(graph, removed)).check()
    finally:
        for node, target, args, kwargs in saved:
            node.target, node.args, node.kwargs = target, args, kwargs


def refusal(gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray]) -> tuple[str, str] | None:
    """``(node, reason)`` if removing ``removed`` gives an inconsistent graph, else ``None``; ``gm`` is unchanged."""
    return check_removal(gm, graph, removed).problem


class _PrunedShapeCheck(fx.Interpreter):
    """Runs the resized graph on fake tensors with the pruned parameter shapes; writes no metadata.

    At the example's sizes (a static fake mode; its shape env only for data-dependent sizes): running the
    graph on export's symbolic fakes re-simplified the shape guards at every op (seconds per node on a
    windowed attention); a removal that would bake in a size is caught at the manager's second shape.
    A node whose value nothing reads (the input-shape guards) is not run."""

    def __init__(self, gm: fx.GraphModule, sizes: PrunedSizes, expected: dict[tuple[str, int], int]):
        super().__init__(gm)
        self.sizes, self.expected = sizes, expected
        self.mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        self.mode.cache_enabled = False  # every op runs once: cache entries would only cost
        self.values: dict[str, Any] = {}

    def check(self) -> PruningCheck:
        try:
            with self.mode:
                self.run(*[pytree.tree_map(_at_example_size, n.meta.get("val")) for n in self.graph.nodes if n.op == "placeholder"])
        except _Mismatch as mismatch:
            return PruningCheck((mismatch.node, mismatch.reason), {})
        return PruningCheck(None, self.values)

    def run_node(self, n: fx.Node):
        try:
            result = self._value(n)
        except Exception as error:  # an op's shape rule rejects the pruned inputs
            raise _Mismatch(n.name, f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
        for dim, size in enumerate(result.shape if isinstance(result, torch.Tensor) else ()):
            want = self.expected.get((n.name, dim))
            if want is not None and size != want:
                raise _Mismatch(n.name, f"dim {dim} would have size {size}, the channel analysis expects {want}")
        self.values[n.name] = result
        return result

    def _value(self, n: fx.Node):
        if n.op == "get_attr" and isinstance(value := self.fetch_attr(n.target), torch.Tensor):
            return torch.empty(self.sizes.new_shape(n), dtype=value.dtype, device=value.device)
        if n.op not in ("placeholder", "output") and not n.users:
            return None
        if n.op == "call_function" and n.target in _INFERENCE_BATCH_NORMS and not n.kwargs:
            return _inference_batch_norm_shapes(n, self.env)
        return super().run_node(n)


_INFERENCE_BATCH_NORMS = {torch.ops.aten._native_batch_norm_legit_no_training.default, torch.ops.aten.batch_norm.default}


def _inference_batch_norm_shapes(n: fx.Node, env: dict):
    """Inference BatchNorm's shape rule without its decomposition (~20 fake ops, most of the check's time on
    a DenseNet): every per-channel tensor has the input's channel count, the output is shaped like the input."""
    x, *per_channel = [env[a] if isinstance(a, fx.Node) else a for a in n.args[:5]]
    if x.ndim < 2:
        raise RuntimeError(f"batch norm of a {x.ndim}-D input")
    for name, value in zip(("weight", "bias", "running_mean", "running_var"), per_channel):
        if isinstance(value, torch.Tensor) and tuple(value.shape) != (x.shape[1],):
            raise RuntimeError(f"batch norm {name} of shape {tuple(value.shape)} for an input with {x.shape[1]} channels")
    out = torch.empty_like(x)
    if n.target is torch.ops.aten.batch_norm.default:
        return out
    return out, x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))


def _at_example_size(value):
    """A fake tensor (or size) of export's symbolic mode at the example's sizes, in the current mode."""
    if isinstance(value, torch.Tensor):
        shape, stride = [hint_int(s) for s in value.shape], [hint_int(s) for s in value.stride()]
        return torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
    return hint_int(value) if isinstance(value, torch.SymInt) else value


class _Mismatch(Exception):
    def __init__(self, node: str, reason: str):
        super().__init__(f"{node}: {reason}")  # fx.Interpreter appends the node to the message
        self.node, self.reason = node, reason


def apply_pruning(
    gm: fx.GraphModule, graph: ChannelGraph, removed: dict[int, np.ndarray], refresh_meta: bool = True,
    check: PruningCheck | None = None,
) -> list[str]:
    """Rewrite ``gm`` in place; returns the parameter/buffer targets that were sliced.

    Raises ``RuntimeError`` (naming the node) for a removal :func:`refusal` would refuse. ``check``: this
    removal's :func:`check_removal`, if already run (its fake values become the nodes' ``meta["val"]``).
    ``refresh_meta=False`` leaves the old fake values (for throw-away trial copies that are only run)."""
    check = check or check_removal(gm, graph, removed)
    if check.problem is not None:
        raise RuntimeError(f"prune_channels cannot remove these channels: at {check.problem[0]}, {check.problem[1]}")
    sizes = pruned_sizes(gm, graph, removed)
    _resize_all(gm, sizes)
    sliced = _slice_attrs(gm, sizes)
    if refresh_meta:
        _write_values(gm, check.values, sliced)
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


def _write_values(gm: fx.GraphModule, values: dict[str, Any], sliced: list[str]) -> None:
    """New ``meta["val"]``: the old (symbolic) fake values with each concrete dim at its checked size; every
    reader of a ``sliced`` attribute's from its new tensor (a constant another pass added, such as fold_bn's
    bias, carries a real tensor, which restamping would leave at the old shape)."""
    for node in gm.graph.nodes:
        old = node.meta.get("val")
        if node.op == "get_attr" and node.target in sliced and isinstance(old, torch.Tensor):
            value = ir.get_attr(gm, node.target)
            node.meta["val"] = _restamped(old, value) if isinstance(old, FakeTensor) else value.detach()
        elif node.name in values and old is not None and node.op != "output":
            leaves, spec = pytree.tree_flatten(old)
            new = pytree.tree_leaves(values[node.name])
            if len(new) == len(leaves):
                node.meta["val"] = pytree.tree_unflatten([_restamped(a, b) for a, b in zip(leaves, new)], spec)


def _restamped(old, checked):
    """``old`` with the concrete sizes of ``checked``; dense strides in ``checked``'s dim order."""
    if not isinstance(old, FakeTensor) or not isinstance(checked, torch.Tensor) or old.ndim != checked.ndim:
        return old
    shape = [c if isinstance(o, int) else o for o, c in zip(old.shape, checked.shape)]
    if shape == list(old.shape):
        return old
    order = sorted(range(len(shape)), key=lambda d: (checked.stride()[d], -d))  # innermost first
    stride, step = [0] * len(shape), 1
    for d in order:
        stride[d] = step
        step = step * shape[d]
    meta = torch.empty_strided(shape, stride, dtype=old.dtype, device="meta")  # not dispatched through the mode
    return FakeTensor(old.fake_mode, meta, old.device)
