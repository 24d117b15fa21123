"""Channel dependency analysis for ``prune_channels``.

Every dimension ``d`` of every tensor-valued node ``v`` is a *channel space* ``(v, d)`` of
size ``v.shape[d]`` (symbolic dims have no space). Per-op rules (``_prune_rules``) add links:

* identity ``(a, i) ~ (b, i)`` for all ``i`` (elementwise ops, a conv weight's dim 0 and the
  conv output's dim 1, ...), and
* index maps ``(a, f(i)) ~ (b, g(i))`` (``cat`` offsets, ``split`` ranges, ``flatten`` one
  channel -> H*W features, a head dim split out of a hidden dim, grouped convolutions).

A dim an op touches but does not link (a kernel dim, a reduced dim, a dim of an op the
analysis does not know) is *frozen*. The identity links are contracted first (networkx
components = *classes*, all of one size); the index maps then join class elements
``(class, i)`` into *units* (networkx components of the element graph), the smallest sets of
indices that can be removed together; the class-level components are the *groups*. A unit
that touches a frozen class, or holds no parameter, is not prunable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from fxcompress import ir, selectors


def op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return str(packet) if packet is not None else getattr(target, "__name__", str(target))


def arg(node: fx.Node, name: str, default=None):
    """Value of argument ``name`` of an ATen op node (schema default if omitted, ``default`` if no such argument)."""
    return ir.call_arguments(node).get(name, default)


@dataclass(frozen=True)
class Space:
    node: str
    dim: int
    size: int


@dataclass
class Unit:
    """Indices removed together: ``elements[space_id]`` is a sorted index array."""

    elements: dict[int, np.ndarray]


@dataclass
class Group:
    spaces: list[int]
    units: list[Unit]
    frozen_units: int
    width: int
    normalized: bool  # a LayerNorm normalizes over these channels (pruning changes its statistics)


@dataclass
class ChannelGraph:
    spaces: list[Space]
    groups: list[Group]
    blocked: list[tuple[str, str]] = field(default_factory=list)
    param_spaces: dict[int, tuple[str, int]] = field(default_factory=dict)  # space -> (attr target, dim)


def tensor_shape(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    if node.op == "get_attr":
        value = ir.get_attr(gm, node.target)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return ir.fake_shape(node)


class Builder:
    """Collects spaces, links and freezes while the per-op rules walk the graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.spaces: list[Space] = []
        self.ids: dict[tuple[str, int], int] = {}
        self.identity_edges: list[tuple[int, int]] = []
        self.map_edges: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self.frozen: dict[int, str] = {}
        self.unknown_ops: dict[int, str] = {}
        self.carriers: set[int] = set()
        self.normalized: set[int] = set()
        self.touched: set[int] = set()  # spaces the current op's rule linked or released
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
        """``dim`` of ``node`` may lose indices at this op without any counterpart elsewhere."""
        sid = self.space(node, dim)
        if sid is not None:
            self.touched.add(sid)

    def freeze_node(self, node: fx.Node, reason: str, unknown: bool = False) -> None:
        for dim in range(self.ndim(node)):
            sid = self.space(node, dim)
            if sid is not None:
                self.frozen.setdefault(sid, reason)
                if unknown:
                    self.unknown_ops.setdefault(sid, reason)

    def freeze_untouched(self, nodes: list[fx.Node], op: str) -> None:
        """Freeze every dim of ``nodes`` that the current op's rule neither linked nor released."""
        for node in nodes:
            for dim in range(self.ndim(node)):
                sid = self.space(node, dim)
                if sid is not None and sid not in self.touched:
                    self.frozen.setdefault(sid, f"dim {dim} of {node.name} is not a channel dim of {op}")


def analyze(gm: fx.GraphModule, ignore: tuple[str, ...] = (), prune_outputs: bool = False) -> ChannelGraph:
    """Build the channel dependency graph of ``gm`` and its prunable groups."""
    from fxcompress.passes._prune_rules import apply_rule

    builder = Builder(gm)
    _link_tied_attrs(gm, builder)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            builder.freeze_node(node, "graph input")
        elif node.op == "output" and not prune_outputs:
            for out in _tensor_nodes(node.args):
                builder.freeze_node(out, "graph output")
        elif node.op == "get_attr" and _is_ignored(node.target, ignore):
            builder.freeze_node(node, f"{node.target} is in ignore=")
        elif node.op == "get_attr" and not node.users:
            builder.freeze_node(node, f"{node.target} is not read by the graph")
        elif node.op == "call_function":
            apply_rule(node, builder)
    graph = _group(builder)
    _warn_unknown(builder, graph)
    return graph


def _tensor_nodes(args) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg(args, nodes.append)
    return [n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor) or n.op == "get_attr"]


def _is_ignored(target: str, ignore: tuple[str, ...]) -> bool:
    return selectors.first_match(ignore, target) is not None


def _link_tied_attrs(gm: fx.GraphModule, builder: Builder) -> None:
    """Several get_attr nodes reading one tensor (tied weights) must be pruned alike."""
    first: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        value = ir.get_attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        key = id(value)
        if key in first:
            for dim in range(value.ndim):
                builder.identity(first[key], dim, node, dim)
        else:
            first[key] = node


def _group(builder: Builder) -> ChannelGraph:
    classes = nx.Graph()
    classes.add_nodes_from(range(len(builder.spaces)))
    classes.add_edges_from(builder.identity_edges)
    class_of: dict[int, int] = {}
    members: list[list[int]] = []
    for cid, comp in enumerate(nx.connected_components(classes)):
        members.append(sorted(comp))
        for sid in comp:
            class_of[sid] = cid
    frozen_classes = {class_of[s] for s in builder.frozen}
    groups_graph = nx.Graph()
    groups_graph.add_nodes_from(range(len(members)))
    groups_graph.add_edges_from((class_of[a], class_of[b]) for a, b, _, _ in builder.map_edges)
    maps_by_group: dict[int, list] = {}
    group_of_class: dict[int, int] = {}
    class_sets = list(nx.connected_components(groups_graph))
    for gid, comp in enumerate(class_sets):
        for cid in comp:
            group_of_class[cid] = gid
    for a, b, ia, ib in builder.map_edges:
        maps_by_group.setdefault(group_of_class[class_of[a]], []).append((class_of[a], class_of[b], ia, ib))

    param_spaces = _param_spaces(builder)
    graph = ChannelGraph(builder.spaces, [], param_spaces=param_spaces)
    for gid, comp in enumerate(class_sets):
        if not any(s in param_spaces for cid in comp for s in members[cid]):
            continue
        element_units = _element_units(comp, members, builder.spaces, maps_by_group.get(gid, []))
        units, frozen = [], 0
        for unit in element_units:
            if any(cid in frozen_classes for cid in unit):
                frozen += 1
                continue
            elements = {s: idx for cid, idx in unit.items() for s in members[cid]}
            if any(s in param_spaces for s in elements):
                units.append(Unit(elements))
        spaces = sorted(s for cid in comp for s in members[cid])
        normalized = any(s in builder.normalized for s in spaces)
        graph.groups.append(Group(spaces, units, frozen, _unit_width(units, param_spaces), normalized))
    return graph


def _element_units(classes: set[int], members, spaces, maps) -> list[dict[int, np.ndarray]]:
    """Connected components of the element graph ``(class, index)`` under the index maps."""
    if not maps:
        (cid,) = classes
        return [{cid: np.array([i])} for i in range(spaces[members[cid][0]].size)]
    elements = nx.Graph()
    for cid in classes:
        elements.add_nodes_from((cid, i) for i in range(spaces[members[cid][0]].size))
    for ca, cb, ia, ib in maps:
        elements.add_edges_from(zip(((ca, int(i)) for i in ia), ((cb, int(j)) for j in ib)))
    units = []
    for comp in nx.connected_components(elements):
        by_class: dict[int, list[int]] = {}
        for cid, i in comp:
            by_class.setdefault(cid, []).append(i)
        units.append({cid: np.array(sorted(idx)) for cid, idx in by_class.items()})
    units.sort(key=lambda u: min((c, int(i[0])) for c, i in u.items()))
    return units


def _param_spaces(builder: Builder) -> dict[int, tuple[str, int]]:
    result = {}
    for node in builder.gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = ir.get_attr(builder.gm, node.target)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            for dim in range(value.ndim):
                sid = builder.ids.get((node.name, dim))
                if sid is not None:
                    result[sid] = (node.target, dim)
    return result


def _unit_width(units: list[Unit], param_spaces: dict[int, tuple[str, int]]) -> int:
    """Channels one unit removes from its group's first weight (>= 2-D) out-dim, for ``round_to``."""
    if not units:
        return 1
    targets_with_dim1 = {t for t, d in param_spaces.values() if d == 1}
    for sid, idx in units[0].elements.items():
        if sid in param_spaces and param_spaces[sid][1] == 0 and param_spaces[sid][0] in targets_with_dim1:
            return len(idx)
    return 1


def _warn_unknown(builder: Builder, graph: ChannelGraph) -> None:
    """Warn once per unknown op that kept channels of a parameterized group unprunable."""
    group_spaces = {s for g in graph.groups for s in g.spaces}
    reported: set[str] = set()
    for sid, reason in builder.unknown_ops.items():
        if sid in group_spaces and reason not in reported:
            reported.add(reason)
            warnings.warn(f"prune_channels: {reason}; the channels flowing through it are kept", stacklevel=3)
            graph.blocked.append((builder.spaces[sid].node, reason))
