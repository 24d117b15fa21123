"""The contract between the channel analysis, the rewrite and the per-op handlers.

A :class:`ChannelHandler` holds everything ``prune_channels`` knows about one op: ``link`` tells the
analysis which dims of the op's inputs and outputs are the same channels, and ``resize`` rewrites the
op's size arguments once channels are removed. Handlers are keyed by the op overload object and
registered next to their code with :func:`channel_rule`; users teach the pass their own ops with
:func:`register_channel_rule`. Elementwise ATen ops (``torch.Tag.pointwise``) need no handler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.errors import PassConfigError


def op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return str(packet) if packet is not None else getattr(target, "__name__", str(target))


def arg(node: fx.Node, name: str, default=None):
    """Value of argument ``name`` of an ATen op node (schema default if omitted, ``default`` if no such argument)."""
    return ir.call_arguments(node).get(name, default)


def tensor_shape(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    if node.op == "get_attr":
        value = ir.get_attr(gm, node.target)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return ir.fake_shape(node)


@dataclass(frozen=True)
class Space:
    node: str
    dim: int
    size: int


class Builder:
    """Collects channel spaces, links and freezes while the handlers' ``link`` walk the graph.

    Every dim of every tensor-valued node with a concrete size is a space. ``identity(a, i, b, j)``:
    dim ``i`` of ``a`` and dim ``j`` of ``b`` are the same channels; ``map(a, i, b, j, ia, ib)``: index
    ``ia[k]`` of the one goes with ``ib[k]`` of the other; ``release(node, d)``: the dim may lose
    indices at this op without a counterpart. A dim the current handler does none of this to is frozen.
    """

    def __init__(self, gm: fx.GraphModule, avoid_carriers: dict[str, set[int]] | None = None, query_heads: bool = False):
        self.gm = gm
        self.query_heads = query_heads  # GQA: a merge of (key/value heads, expanded query heads) carries the latter
        self.spaces: list[Space] = []
        self.ids: dict[tuple[str, int], int] = {}
        self.identity_edges: list[tuple[int, int]] = []
        self.map_edges: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self.frozen: dict[int, tuple[str, str]] = {}  # space -> (reason, where)
        self.unknown_ops: dict[int, str] = {}
        self.carriers: set[int] = set()
        self.carrier_choices: dict[str, tuple[int, int]] = {}  # reshape node -> (factor, carrier space)
        self.avoid_carriers = avoid_carriers or {}  # reshape node -> factors whose class turned out frozen
        self.normalized: set[int] = set()
        self.unions: set[int] = set()  # concatenation outputs: their inputs' channels are chosen independently
        self.touched: set[int] = set()  # spaces the current op's handler linked or released
        for node in gm.graph.nodes:
            for dim, size in enumerate(tensor_shape(gm, node) or ()):
                if isinstance(size, int):
                    self.ids[(node.name, dim)] = len(self.spaces)
                    self.spaces.append(Space(node.name, dim, size))

    def shared_attr(self, node: fx.Node) -> bool:
        """Whether the tensor ``node`` reads is also read by another op (tied weights)."""
        if node.op != "get_attr":
            return False
        value = ir.get_attr(self.gm, node.target)
        readers = {u for n in self.gm.graph.nodes if n.op == "get_attr" and ir.get_attr(self.gm, n.target) is value for u in n.users}
        return len(readers) > 1

    def space(self, node: fx.Node, dim: int) -> int | None:
        shape = tensor_shape(self.gm, node) or ()
        return self.ids.get((node.name, dim % len(shape))) if shape else None

    def size(self, node: fx.Node, dim: int):
        return (tensor_shape(self.gm, node) or ())[dim]

    def ndim(self, node: fx.Node) -> int:
        return len(tensor_shape(self.gm, node) or ())

    def identity(self, a: fx.Node, a_dim: int, b: fx.Node, b_dim: int) -> None:
        sa, sb = self.space(a, a_dim), self.space(b, b_dim)
        if (sa is None) != (sb is None):  # the same channels as a dim of symbolic size
            known, other, other_dim = (sa, b, b_dim) if sa is not None else (sb, a, a_dim)
            self.frozen.setdefault(known, ("the same dim as one of symbolic size", f"dim {other_dim} of {other.name}"))
        if sa is None or sb is None or self.spaces[sa].size != self.spaces[sb].size:
            return  # left untouched, hence frozen
        self.touched |= {sa, sb}
        self.identity_edges.append((sa, sb))
        if sa in self.carriers or sb in self.carriers:
            self.carriers |= {sa, sb}

    def map(self, a: fx.Node, a_dim: int, b: fx.Node, b_dim: int, a_idx, b_idx) -> None:
        sa, sb = self.space(a, a_dim), self.space(b, b_dim)
        if sa is None or sb is None:
            return
        self.touched |= {sa, sb}
        self.map_edges.append((sa, sb, np.asarray(a_idx, dtype=np.int64), np.asarray(b_idx, dtype=np.int64)))

    def release(self, node: fx.Node, dim: int) -> None:
        sid = self.space(node, dim)
        if sid is not None:
            self.touched.add(sid)

    def union_of_inputs(self, node: fx.Node, dim: int) -> None:
        """``dim`` of ``node`` is the union of its inputs' channels (``cat``): each input's channels are
        chosen at their own ratio, not as one group with the others (the units stay what they are)."""
        sid = self.space(node, dim)
        if sid is not None:
            self.unions.add(sid)

    def freeze_node(self, node: fx.Node, reason: str, where: str = "", unknown: bool = False) -> None:
        for dim in range(self.ndim(node)):
            sid = self.space(node, dim)
            if sid is not None:
                self.frozen.setdefault(sid, (reason, where or node.name))
                if unknown:
                    self.unknown_ops.setdefault(sid, f"{reason} (node {where})")

    def freeze_untouched(self, nodes: list[fx.Node], op: str, where: str) -> None:
        """Freeze every dim of ``nodes`` that the current op's handler neither linked nor released."""
        for node in nodes:
            for dim in range(self.ndim(node)):
                sid = self.space(node, dim)
                if sid is not None and sid not in self.touched:
                    self.frozen.setdefault(sid, (f"{op} does not treat the dim as channels", f"{where}, dim {dim} of {node.name}"))


class PrunedSizes:
    """Old and new sizes of every channel space, looked up by fx node (what ``resize`` reads)."""

    def __init__(self, gm: fx.GraphModule, removed: dict[tuple[str, int], np.ndarray]):
        self.gm = gm
        self.removed = {key: idx for key, idx in removed.items() if len(idx)}

    def removed_at(self, node: fx.Node, dim: int) -> np.ndarray:
        shape = tensor_shape(self.gm, node)
        return self.removed.get((node.name, dim % len(shape)), np.empty(0, dtype=np.int64))

    def old_shape(self, node: fx.Node) -> tuple:
        return tensor_shape(self.gm, node)

    def new_shape(self, node: fx.Node) -> list:
        return [size - len(self.removed_at(node, d)) for d, size in enumerate(tensor_shape(self.gm, node))]

    def changed(self, node: fx.Node) -> bool:
        return any(len(self.removed_at(node, d)) for d in range(len(tensor_shape(self.gm, node))))


class ChannelHandler:
    """What ``prune_channels`` knows about one op; subclass it and override what the op needs.

    ``link(node, b, inputs, outputs)``: call ``b.identity``/``b.map``/``b.release`` for the dims of
    ``inputs`` (the op's tensor arguments) and ``outputs`` (its tensor results) that carry channels
    through the op; every other dim of them is frozen. The default links nothing: all frozen.
    ``resize(node, sizes)``: after channels were removed, rewrite the node's non-tensor arguments
    (shape lists, group counts, split sizes) from ``sizes`` (:class:`PrunedSizes`) so the op computes
    the pruned tensors. The default rewrites nothing. A wrong handler cannot corrupt the model: the
    rewrite is shape-checked and refused, with the node named, before any weight is sliced.
    """

    def link(self, node: fx.Node, b: Builder, inputs: list[fx.Node], outputs: list[fx.Node]) -> None:
        """Declare the channel links of one call of the op (see the class docstring)."""

    def resize(self, node: fx.Node, sizes: PrunedSizes) -> None:
        """Rewrite the node's size arguments after pruning (see the class docstring)."""


class Pointwise(ChannelHandler):
    """out = f(x, y, ...) with broadcasting: dims aligned from the right are the same channels."""

    def link(self, node, b, inputs, outputs):
        out = outputs[0]
        for x in inputs:
            for k in range(1, min(b.ndim(x), b.ndim(out)) + 1):
                b.identity(x, -k, out, -k)


HANDLERS: dict[torch._ops.OpOverload, ChannelHandler] = {}
POINTWISE = Pointwise()


def _overloads(op) -> list[torch._ops.OpOverload]:
    op = getattr(op, "_opoverload", op)  # a torch.library.custom_op object
    if isinstance(op, torch._ops.OpOverload):
        return [op]
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    raise PassConfigError(
        f"register_channel_rule takes an op overload (torch.ops.mylib.op.default), its packet "
        f"(torch.ops.mylib.op) or a torch.library.custom_op, not {op!r}"
    )


def register_channel_rule(op, handler: ChannelHandler | type[ChannelHandler]) -> None:
    """Teach ``prune_channels`` an op: ``handler`` (a :class:`ChannelHandler`) says how its channels
    are coupled and how it is resized; a packet registers all its overloads. Replaces an earlier rule."""
    if isinstance(handler, type) and issubclass(handler, ChannelHandler):
        handler = handler()
    if not isinstance(handler, ChannelHandler):
        raise PassConfigError(f"register_channel_rule needs a ChannelHandler (subclass or instance), not {handler!r}")
    for overload in _overloads(op):
        HANDLERS[overload] = handler


def channel_rule(*ops):
    """Class decorator: register one instance of the handler class for every op in ``ops``."""

    def register(cls: type[ChannelHandler]) -> type[ChannelHandler]:
        handler = cls()
        for op in ops:
            register_channel_rule(op, handler)
        return cls

    return register


def handler_for(target) -> ChannelHandler | None:
    """The registered handler of ``target``; elementwise ATen ops (tagged pointwise) need none."""
    handler = HANDLERS.get(target)
    if handler is None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return POINTWISE
    return handler
