"""MACs of a pruned model without rewriting it: what ``target_macs`` bisects over.

One run of the graph on the example inputs records, per node, the multiply-accumulates that
``FlopCounterMode`` counts and the concrete shapes of the node's tensor arguments. A node's MACs
depend only on those shapes, so after removing channels each counting node is re-evaluated alone on
``meta`` tensors of its pruned argument shapes (its input and parameter spaces shrunk by the removed
indices), cached per shape: exact wherever the op's flop formula is, at the cost of a few counted
nodes per candidate instead of a copy and a run of the whole model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from fxcompress.pass_base import PassContext
from fxcompress.passes.prune.graph import ChannelGraph
from fxcompress.shapes import flat_inputs


class MacModel:
    """``macs(removed)`` for any removal of the analysis' channel spaces (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, graph: ChannelGraph, ctx: PassContext):
        self.space_ids = {(s.node, s.dim): sid for sid, s in enumerate(graph.spaces)}
        self.nodes, self.total = _counted_nodes(gm, ctx)
        self.cache: dict[tuple, int] = {}
        # every counting node, re-evaluated alone on meta tensors, counts what it counted in the run
        # (not for a higher-order op or a submodule call, or an op without a meta kernel)
        self.exact = all(_reproduces(*entry) for entry in self.nodes)

    def macs(self, removed: dict[int, np.ndarray]) -> int:
        total = 0
        for node, macs, arguments, others, call in self.nodes:
            shapes = {name: self._pruned(name, shape, removed) for name, (shape, _) in arguments.items()}
            key = (node.name, tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
            if key not in self.cache:
                unchanged = all(tuple(shapes[k]) == shape for k, (shape, _) in arguments.items())
                self.cache[key] = macs if unchanged else _macs_on_meta(node, call, shapes, arguments, others)
            total += self.cache[key]
        return total

    def _pruned(self, name: str, shape: tuple, removed: dict[int, np.ndarray]) -> list[int]:
        return [size - len(removed.get(self.space_ids.get((name, d), -1), ())) for d, size in enumerate(shape)]


def _counted_nodes(gm: fx.GraphModule, ctx: PassContext) -> tuple[list, int]:
    """``[(node, MACs, {tensor argument: (shape, dtype)}, {other argument: value}, (args, kwargs))]`` for every
    node that counts MACs (with its call as captured: the rewrite may change it later), and the total."""
    counter = FlopCounterMode(display=False)
    recorder = _Recorder(gm, counter)
    with torch.no_grad(), counter:
        recorder.run(*flat_inputs(gm, ctx.args, ctx.kwargs))
    return recorder.counted, counter.get_total_flops() // 2


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter, self.counted = counter, []

    def run_node(self, n: fx.Node):
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        macs = (self.counter.get_total_flops() - before) // 2
        if macs:
            values = {a.name: self.env[a] for a in n.all_input_nodes}
            arguments = {k: (tuple(v.shape), v.dtype) for k, v in values.items() if isinstance(v, torch.Tensor)}
            self.counted.append((n, macs, arguments, {k: v for k, v in values.items() if k not in arguments}, (n.args, n.kwargs)))
        return result


def _reproduces(node: fx.Node, macs: int, arguments: dict, others: dict, call: tuple) -> bool:
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    try:
        return _macs_on_meta(node, call, {k: list(shape) for k, (shape, _) in arguments.items()}, arguments, others) == macs
    except Exception:  # no meta kernel: the MAC model cannot evaluate the op
        return False


def _macs_on_meta(node: fx.Node, call: tuple, shapes: dict[str, list[int]], arguments: dict, others: dict) -> int:
    def value(a: fx.Node):
        if a.name in shapes:
            return torch.empty(shapes[a.name], dtype=arguments[a.name][1], device="meta")
        return others[a.name]

    args, kwargs = fx.node.map_arg(call, value)
    args, kwargs = _pruned_groups(node, call[0], shapes, arguments, args, kwargs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        node.target(*args, **kwargs)
    return counter.get_total_flops() // 2


def _pruned_groups(node: fx.Node, call_args: tuple, shapes: dict, arguments: dict, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A grouped conv loses whole groups (``layers.Conv.resize``): ``groups`` shrinks with its weight's dim 0
    (a depthwise conv keeps groups == channels)."""
    schema = [a.name for a in node.target._schema.arguments]
    if "groups" not in schema or len(call_args) < 2 or not isinstance(call_args[1], fx.Node):
        return args, kwargs
    index, weight = schema.index("groups"), call_args[1].name
    groups = args[index] if index < len(args) else kwargs.get("groups", 1)
    if groups == 1 or weight not in shapes:
        return args, kwargs
    new_groups = shapes[weight][0] // (arguments[weight][0][0] // groups)
    if index < len(args):
        return (*args[:index], new_groups, *args[index + 1:]), kwargs
    return args, {**kwargs, "groups": new_groups}


__all__ = ["MacModel"]
