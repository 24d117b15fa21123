"""Channel dependency analysis for ``prune_channels``.

Every dimension ``d`` of every tensor-valued node ``v`` is a *channel space* ``(v, d)`` of
size ``v.shape[d]`` (symbolic dims have no space). Each op's handler (:mod:`.core`) adds links:

* identity ``(a, i) ~ (b, i)`` for all ``i`` (elementwise ops, a conv weight's dim 0 and the
  conv output's dim 1, ...), and
* index maps ``(a, f(i)) ~ (b, g(i))`` (``cat`` offsets, ``split`` ranges, ``flatten`` one
  channel -> H*W features, a head dim split out of a hidden dim, grouped convolutions).

A dim an op touches but does not link (a kernel dim, a reduced dim, a dim taken apart by ``select``,
a dim of an op without a handler) is *frozen*, with the reason. The identity links are contracted
first (union-find *classes*, all of one size); the index maps then join class elements
``(class, i)`` into *units*, the smallest sets of indices that can be removed together; the
class-level components are the *groups*. A unit that touches a frozen class, or holds no parameter,
is not prunable; frozen units are counted per reason.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from networkx.utils import UnionFind

from fxcompress import ir, selectors
from fxcompress.passes.prune.core import Builder, Space, handler_for, op_name, tensor_shape

NO_CHANNEL_EFFECT = (torch.ops.aten.sym_size, torch.ops.aten.sym_numel, torch.ops.aten.sym_stride, torch.ops.aten._assert_scalar)
MAX_RELINKS = 4  # re-analyses with frozen reshape carriers avoided (each pass fixes all it finds)


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
    frozen: dict[str, dict] = field(default_factory=dict)  # reason -> units, channels, an example
    class_of: list[int] = field(default_factory=list)  # space -> identity class (equal sizes, equal removals)


def analyze(gm: fx.GraphModule, ignore: tuple[str, ...] = (), prune_outputs: bool = False,
            query_heads: bool = False) -> ChannelGraph:
    """Build the channel dependency graph of ``gm`` and its prunable groups; ``query_heads``: grouped-query
    attention prunes query heads inside every key/value group instead of whole groups."""
    avoid: dict[str, set[int]] = {}
    for _ in range(MAX_RELINKS + 1):
        builder = _link(gm, ignore, prune_outputs, avoid, query_heads)
        class_of = _classes(builder)
        frozen_classes = {class_of[s] for s in builder.frozen}
        new = {
            name: factor for name, (factor, carrier, whole) in builder.carrier_choices.items()
            if class_of[carrier] in frozen_classes and class_of[whole] not in frozen_classes
            and factor not in avoid.get(name, ())
        }
        if not new:
            break
        for name, factor in new.items():
            avoid.setdefault(name, set()).add(factor)
    graph = _group(builder, class_of, frozen_classes)
    _warn_unknown(builder, graph)
    return graph


def _link(gm: fx.GraphModule, ignore: tuple[str, ...], prune_outputs: bool, avoid: dict[str, set[int]],
          query_heads: bool = False) -> Builder:
    builder = Builder(gm, avoid, query_heads)
    _link_tied_attrs(gm, builder)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            builder.freeze_node(node, "graph input")
        elif node.op == "output" and not prune_outputs:
            for out in _tensor_nodes(node.args):
                builder.freeze_node(out, "graph output (prune_outputs=False)")
        elif node.op == "get_attr" and selectors.first_match(ignore, node.target) is not None:
            builder.freeze_node(node, "in ignore=", node.target)
        elif node.op == "get_attr" and not node.users:
            builder.freeze_node(node, "not read by the graph", node.target)
        elif node.op == "call_function":
            _link_call(node, builder)
    return builder


def _link_call(node: fx.Node, b: Builder) -> None:
    if node.target is operator.getitem:
        return  # linked by the handler of the op that produced the tuple
    inputs = [n for n in _flat_nodes(node.args, node.kwargs) if tensor_shape(b.gm, n) is not None]
    outputs = _outputs(node, b)
    if not outputs and not inputs:
        return
    if getattr(node.target, "overloadpacket", None) in NO_CHANNEL_EFFECT and not outputs:
        return
    handler, name = handler_for(node.target), op_name(node)
    if handler is None:
        for n in inputs + outputs:
            b.freeze_node(n, f"unsupported op {name}", node.name, unknown=True)
        return
    b.touched.clear()  # what this handler links or releases; the rest of its dims is frozen
    handler.link(node, b, inputs, outputs)
    b.freeze_untouched(inputs + outputs, name, node.name)


def _flat_nodes(args, kwargs) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg((args, kwargs), nodes.append)
    return list(dict.fromkeys(nodes))


def _outputs(node: fx.Node, b: Builder) -> list[fx.Node]:
    if isinstance(node.meta.get("val"), torch.Tensor):
        return [node]
    return [u for u in node.users if u.target is operator.getitem and tensor_shape(b.gm, u) is not None]


def _tensor_nodes(args) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg(args, nodes.append)
    return [n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor) or n.op == "get_attr"]


def _link_tied_attrs(gm: fx.GraphModule, builder: Builder) -> None:
    """Several get_attr nodes reading one tensor (tied weights) must be pruned alike."""
    first: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        value = ir.get_attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        if id(value) in first:
            for dim in range(value.ndim):
                builder.identity(first[id(value)], dim, node, dim)
        else:
            first[id(value)] = node


def _classes(builder: Builder) -> list[int]:
    """Class id of every space: the components of the identity links."""
    classes = UnionFind(range(len(builder.spaces)))
    for a, b in builder.identity_edges:
        classes.union(a, b)
    class_of = [0] * len(builder.spaces)
    for cid, members in enumerate(classes.to_sets()):
        for sid in members:
            class_of[sid] = cid
    return class_of


def _group(builder: Builder, class_of: list[int], frozen_classes: set[int]) -> ChannelGraph:
    members: dict[int, list[int]] = {}
    for sid, cid in enumerate(class_of):
        members.setdefault(cid, []).append(sid)
    components = UnionFind(members)
    for a, b, _, _ in builder.map_edges:
        components.union(class_of[a], class_of[b])
    maps: dict[int, list] = {}
    for a, b, ia, ib in builder.map_edges:
        maps.setdefault(components[class_of[a]], []).append((class_of[a], class_of[b], ia, ib))
    frozen_reason = {class_of[s]: why for s, why in sorted(builder.frozen.items())}
    unions = {class_of[s] for s in builder.unions}
    param_spaces = _param_spaces(builder)
    graph = ChannelGraph(builder.spaces, [], param_spaces=param_spaces, class_of=class_of)
    for comp in components.to_sets():
        if not any(s in param_spaces for cid in comp for s in members[cid]):
            continue
        element_units = _element_units(comp, members, builder.spaces, maps.get(components[next(iter(comp))], []))
        for selection in _selection_groups(element_units, unions):
            units, frozen = [], 0
            for unit in selection:
                elements = {s: idx for cid, idx in unit.items() for s in members[cid]}
                blocked_by = [frozen_reason[cid] for cid in sorted(unit) if cid in frozen_classes]
                if blocked_by:
                    frozen += 1
                    _count_frozen(graph, blocked_by[0], elements, param_spaces)
                elif any(s in param_spaces for s in elements):
                    units.append(Unit(elements))
            classes = {cid for unit in selection for cid in unit}
            own = sorted(s for cid in classes - unions for s in members[cid])
            spaces = own + sorted(s for cid in classes & unions for s in members[cid])  # named by its own first
            if not any(s in param_spaces for s in spaces):
                continue
            normalized = any(s in builder.normalized for s in spaces)
            graph.groups.append(Group(spaces, units, frozen, _unit_width(units, param_spaces), normalized))
    return graph


def _selection_groups(units: list[dict[int, np.ndarray]], unions: set[int]) -> list[list[dict[int, np.ndarray]]]:
    """Units chosen from together: those sharing a class, except a concatenation's output class, which
    is the union of its inputs' channels and does not tie them (each input keeps its own ratio)."""
    owner: dict[int, int] = {}
    tied = UnionFind(range(len(units)))
    for i, unit in enumerate(units):
        for cid in unit:
            if cid not in unions:
                tied.union(i, owner.setdefault(cid, i))
    selections = sorted((sorted(comp) for comp in tied.to_sets()), key=lambda comp: comp[0])
    return [[units[i] for i in comp] for comp in selections]


def _count_frozen(graph: ChannelGraph, why: tuple[str, str], elements: dict, param_spaces: dict) -> None:
    reason, where = why
    channels = max((len(idx) for s, idx in elements.items() if s in param_spaces), default=0)
    if not channels:
        return
    row = graph.frozen.setdefault(reason, {"units": 0, "channels": 0, "example": where})
    row["units"] += 1
    row["channels"] += channels


def _element_units(classes: set[int], members, spaces, maps) -> list[dict[int, np.ndarray]]:
    """Components of the element graph ``(class, index)`` under the index maps."""
    if not maps:
        (cid,) = classes
        return [{cid: np.array([i])} for i in range(spaces[members[cid][0]].size)]
    elements = UnionFind((cid, i) for cid in classes for i in range(spaces[members[cid][0]].size))
    for ca, cb, ia, ib in maps:
        for i, j in zip(ia.tolist(), ib.tolist()):
            elements.union((ca, i), (cb, j))
    units = []
    for comp in elements.to_sets():
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
            warnings.warn(
                f"prune_channels: {reason}; the channels flowing through it are kept "
                "(teach the pass the op with fxcompress.passes.register_channel_rule)", stacklevel=3,
            )
            graph.blocked.append((builder.spaces[sid].node, reason))
