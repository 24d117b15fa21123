"""The static int8 conv rewrite: measured choice per conv, chains, regions, boundary quantize/dequantize.

Called by the ``int8`` pass in ``mode="static"`` (see ``_int8_conv`` for the rules). Rewrite of a
chain ending at ``e`` with input ``x`` (float or int8) and optional int8 residual ``r``::

    e = act(conv(x, W, b) [+ r])  ->  q_e = int8_conv(q_x, s_x, z_x, W_q, s_w, b, ..., s_e, z_e, relu, engine, q_r, ...)

``q_x = quantize_u8(x, s_x, z_x)`` only when ``x`` is float (one node per tensor, shared by its
consumers); float users of ``e`` read ``dequantize_u8(q_e, s_e, z_e)``. Which convs stay int8 is then
decided per region and for the whole model by measurement (``_int8_conv_regions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxcompress import ir, selectors
from fxcompress.ops.int8_linear import quantization_error
from fxcompress.ops.qengine import prepacked
from fxcompress.verify import node_values

from ._int8_conv import (
    CONV_OPS, FUSED_ADD_ENGINES, RELUS, Chain, ConvProblem, Residual, choose_conv_lowering,
    conv_problem, grid_top, is_nonnegative, layer_name, plan_chains, qparams, quantize_weight,
)

fxops = torch.ops.fxcompress


def _geometry(node: fx.Node) -> tuple:
    args = ir.call_arguments(node)
    spatial = CONV_OPS[node.target] - 2

    def expand(value):
        values = [value] if isinstance(value, int) else list(value)
        return [int(v) for v in (values * spatial if len(values) == 1 else values)]

    return expand(args["stride"]), expand(args["padding"]), expand(args["dilation"]), int(args["groups"])


@dataclass
class Region:
    """One connected int8 region of a rewritten graph: its convs, the float nodes it replaced (by name) and
    its nodes in that graph (entry quantizes, int8 ops, exit dequantizes), with the row the report shows."""

    row: dict
    convs: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    int8_nodes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(self.convs)


class ConvLowerer:
    """One run of the static conv lowering over ``gm`` for the pass configuration ``config``.

    :meth:`choose` measures every conv; :meth:`rewrite` emits the chosen ones into ``gm`` or into a copy
    of it (node names are shared, so the region decision can rewrite a trial copy first)."""

    def __init__(self, gm: fx.GraphModule, ctx, config, scales: dict, result):
        self.gm, self.ctx, self.config, self.scales, self.result = gm, ctx, config, scales, result
        self.lowerings: dict[str, object] = {}  # by conv node name
        self.details: dict[str, dict] = {}
        self.weights: dict[str, tuple] = {}
        self.planned: tuple[dict, list] = ({}, [])  # plan_chains with every eligible conv int8

    # -- which convs, measured ----------------------------------------------------------------------

    def _problem(self, node: fx.Node) -> str:
        layer = layer_name(node)
        if selectors.first_match(self.config.skip, layer):
            return "kept in float by skip="
        problem = conv_problem(self.gm, node)
        if problem:
            return problem
        missing = [s for s in (layer, f"{layer}:out") if s not in self.scales]
        if missing:
            return f"no calibrated range for {missing} (calibrate with fxcompress.calibrate on batches that reach it)"
        return ""

    def choose(self) -> set[str]:
        """The names of the convs whose own measurement (with their region boundaries) chose an int8 engine."""
        convs = [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS]
        eligible = []
        for node in convs:
            problem = self._problem(node)
            if problem:
                self.result.skip(layer_name(node), problem)
            else:
                eligible.append(node)
        plans = self._plans(set(eligible))
        wanted = {ir.call_arguments(n)["input"].name for n in eligible}
        wanted |= {plan[2].residual.name for plan in plans.values() if plan[2] is not None}
        values = node_values(self.gm, self.ctx.args, self.ctx.kwargs, wanted)
        chosen = set()
        for node in eligible:
            enters_float, exits_float, add_chain = plans[node]
            problem = self._conv_problem(node, values, enters_float, exits_float, add_chain)
            lowering, detail = self._measure(node, problem)
            self.details[node.name] = detail
            if lowering.engine is None:
                self.result.skip(layer_name(node), f"kept float: {lowering.choice.reason} ({lowering.choice.timings_text() or 'not timed'})")
            else:
                self.lowerings[node.name] = lowering
                chosen.add(node.name)
        return chosen

    def keep_float(self, convs: list[str], reason: str) -> None:
        """Convs an int8 region or the whole-model check rejected: listed as skipped with ``reason``."""
        for name in convs:
            self.lowerings.pop(name, None)
            for trial_only in ("region", "fused", "output_qparams"):  # set by the trial rewrite
                self.details[name].pop(trial_only, None)
            self.details[name].update(impl="float", kept_float=reason)
            self.result.skip(self.details[name]["layer"], f"kept float: {reason}")

    def _plans(self, convs: set[fx.Node]) -> dict[fx.Node, tuple[bool, bool, Chain | None]]:
        """Per conv, if every eligible conv were int8: (float enters, float reads the output, its chain
        when that fuses a residual add the measurement can time: no activation or relu, calibrated pre-add)."""
        if not self.config.conv_regions:
            return {conv: (True, True, None) for conv in convs}
        chains, pools = self.planned = plan_chains(self.gm, convs)
        int8_values = set(chains) | set(pools)
        fused = {n for chain in chains.values() for n in chain.nodes} | set(pools)

        def timed_add(chain: Chain) -> Chain | None:
            timeable = chain.clip in (None, float("inf")) and f"{layer_name(chain.conv)}:conv" in self.scales
            return chain if chain.add is not None and timeable else None

        return {chain.conv: (ir.call_arguments(chain.conv)["input"] not in int8_values,
                             any(u not in fused for u in chain.end.users), timed_add(chain)) for chain in chains.values()}

    def _residual_qparams(self, value: fx.Node) -> tuple[float, int]:
        """The ``(s, z)`` an int8 residual will have: its chain's calibrated output (through int8 max-pools)."""
        chains, pools = self.planned
        while value in pools:
            value = value.args[0]
        chain = chains[value]
        clip = chain.clip
        return qparams(self.scales[f"{layer_name(chain.conv)}:out"], clip is not None, clip if clip != float("inf") else None)

    def _conv_problem(self, node: fx.Node, values: dict, enters_float: bool, exits_float: bool,
                      add_chain: Chain | None) -> ConvProblem:
        layer = layer_name(node)
        args = ir.call_arguments(node)
        x = values[args["input"].name]
        weight = ir.get_attr(self.gm, args["weight"].target).detach()
        bias = ir.get_attr(self.gm, args["bias"].target).detach() if args["bias"] is not None else None
        weight_q, weight_scale = quantize_weight(weight)
        self.weights[node.name] = (weight_q, weight_scale)
        if add_chain is not None:
            relu, r = add_chain.activation is not None, values[add_chain.residual.name]
            r_qparams = self._residual_qparams(add_chain.residual)
            residual = Residual(fxops.quantize_u8(r, *r_qparams, grid_top()), r_qparams, qparams(self.scales[f"{layer}:conv"], False))
        else:
            activation = next(iter(node.users)) if len(node.users) == 1 else None
            relu, r, residual = activation is not None and activation.target in RELUS, None, None
        x_qparams = qparams(self.scales[layer], is_nonnegative(args["input"]))
        out_qparams = qparams(self.scales[self.output_site(layer, add=residual is not None)], relu)
        geometry, conv = _geometry(node), node.target

        def float_run():
            y = conv(x, weight, bias, *geometry)
            y = y if r is None else y + r
            return y.relu() if relu else y

        return ConvProblem(
            device=x.device, x=x, x_q=fxops.quantize_u8(x, *x_qparams, grid_top()), x_qparams=x_qparams, weight_q=weight_q,
            weight_scale=weight_scale, bias=bias, geometry=geometry, out_qparams=out_qparams, relu=relu, float_run=float_run,
            key={"op": str(conv), "x": list(x.shape), "weight": list(weight.shape), "geometry": geometry, "relu": relu,
                 "bias": bias is not None, "enters_float": enters_float, "exits_float": exits_float,
                 **({"residual_add": list(r.shape)} if residual is not None else {})},
            enters_float=enters_float, exits_float=exits_float, residual=residual,
        )

    def _measure(self, node: fx.Node, problem: ConvProblem):
        c = self.config
        lowering = choose_conv_lowering(problem, tune=c.tune, allow_slower=c.allow_slower, impl=c.impl,
                                        error_factor=c.error_factor, min_run_time=c.tune_time_s)
        weight_q, weight_scale = self.weights[node.name]
        stride, _, dilation, groups = problem.geometry
        steps = (("quantize", problem.enters_float), ("int8_conv", True), ("add", problem.residual is not None),
                 ("dequantize", problem.exits_float))
        prepacked.discard(weight_q)  # one pack per engine timed; the graph repacks for the engine it runs
        detail = {
            "layer": layer_name(node), "mode": "static", "op": f"{node.target.__name__.split('.')[0]} "
            f"{'x'.join(map(str, weight_q.shape[2:]))} stride {stride} dilation {dilation} groups {groups}",
            "weight_shape": tuple(weight_q.shape), "weight_rel_error": quantization_error(
                ir.get_attr(self.gm, ir.call_arguments(node)["weight"].target).detach().reshape(weight_q.shape[0], -1),
                weight_q.reshape(weight_q.shape[0], -1), weight_scale),
            "input_qparams": problem.x_qparams, "impl": lowering.impl,
            "timed_as": "+".join(p for p, on in steps if on), **lowering.detail(),
        }
        return lowering, detail

    def output_site(self, layer: str, add: bool) -> str:
        """The calibrated site of a chain's output: a conv calibrated with a fused add but lowered without
        it (its residual stayed float) outputs the pre-add value ``layer:conv``."""
        return f"{layer}:conv" if not add and f"{layer}:conv" in self.scales else f"{layer}:out"

    def can_add(self, conv: fx.Node) -> bool:
        engine = self.lowerings[conv.name].engine
        return self.config.conv_regions and (engine in FUSED_ADD_ENGINES or f"{layer_name(conv)}:conv" in self.scales)

    def rewrite(self, gm: fx.GraphModule, chosen: set[str]) -> list[Region]:
        """Emit the ``chosen`` convs (by name) into ``gm`` (``self.gm`` or a copy of it); the regions it made."""
        return _Emitter(self, gm).run({n for n in gm.graph.nodes if n.name in chosen})


class _Emitter:
    """The rewrite of one graph: chains to ``int8_conv`` nodes, entry quantizes, exit dequantizes, regions."""

    def __init__(self, lowerer: ConvLowerer, gm: fx.GraphModule):
        self.lowerer, self.gm, self.config = lowerer, gm, lowerer.config
        self.int8: dict[fx.Node, tuple[fx.Node, tuple[float, int]]] = {}  # float node -> (uint8 node, (s, z))
        self.entries: dict[fx.Node, fx.Node] = {}
        self.origin: dict[fx.Node, list[fx.Node]] = {}  # int8 op -> the float nodes it replaced

    def run(self, chosen: set[fx.Node]) -> list[Region]:
        chains, pools = plan_chains(self.gm, chosen, self.lowerer.can_add)
        if not self.config.conv_regions:  # islands: every chain reads and writes float
            chains = {c.end: c for c in (Chain(c.conv, activation=c.activation) if c.add is None else Chain(c.conv) for c in chains.values())}
            pools = []
        for node in list(self.gm.graph.nodes):
            if node in chains:
                self._emit_chain(chains[node])
            elif node in pools:
                q, params = self.int8[node.args[0]]
                pool = ir.call_arguments(node)
                pool_args = (q, *(list(pool[k]) for k in ("kernel_size", "stride", "padding", "dilation")), bool(pool["ceil_mode"]))
                with self.gm.graph.inserting_before(node):
                    self.int8[node] = (self._call(fxops.int8_max_pool2d.default, pool_args, node), params)
                self.origin[self.int8[node][0]] = [node]
        fused = {n for chain in chains.values() for n in chain.nodes} | set(pools)
        exits = self._dequantize_exits(fused)
        for node in reversed(list(self.gm.graph.nodes)):  # DCE keeps in-place ops (relu_, hardtanh_): erase explicitly
            if node in fused and not node.users:
                self.gm.graph.erase_node(node)
        return self._regions(exits)

    def _input(self, value: fx.Node, layer: str, before: fx.Node) -> tuple[fx.Node, tuple[float, int]]:
        if value in self.int8 and self.config.conv_regions:
            return self.int8[value]
        if value not in self.entries or not self.config.conv_regions:
            params = qparams(self.lowerer.scales[layer], is_nonnegative(value))
            with self.gm.graph.inserting_before(before):
                self.entries[value] = self._call(fxops.quantize_u8.default, (value, *params, grid_top()), before)
            self.entries[value].meta["qparams"] = params
        node = self.entries[value]
        return node, node.meta["qparams"]

    def _emit_chain(self, chain: Chain) -> None:
        conv, lowerer = chain.conv, self.lowerer
        layer = layer_name(conv)
        args = ir.call_arguments(conv)
        q_x, x_params = self._input(args["input"], layer, conv)
        clip = chain.clip
        out_params = qparams(lowerer.scales[lowerer.output_site(layer, chain.add is not None)], clip is not None,
                             clip if clip != float("inf") else None)
        weight_q, weight_scale = lowerer.weights[conv.name]
        base = args["weight"].target
        wq_node = ir.add_constant(self.gm, f"{base}_int8", weight_q, conv)
        scale_node = ir.add_constant(self.gm, f"{base}_scale", weight_scale, conv)
        op_args = [q_x, *x_params, wq_node, scale_node, args["bias"], *_geometry(conv), *out_params, clip is not None,
                   lowerer.lowerings[conv.name].engine]
        if chain.add is not None:
            q_r, r_params = self.int8[chain.residual]
            mid = qparams(lowerer.scales.get(f"{layer}:conv", 1.0 / 127), False)
            op_args += [q_r, *r_params, *mid]
        else:
            op_args += [None, 1.0, 0, 1.0, 0]
        op_args.append(grid_top())
        with self.gm.graph.inserting_before(chain.end):
            q = self._call(fxops.int8_conv.default, tuple(op_args), chain.end)
        self.int8[chain.end] = (q, out_params)
        self.origin[q] = chain.nodes
        lowerer.details[conv.name].update(fused=chain.fused(), output_qparams=out_params)

    def _dequantize_exits(self, fused: set[fx.Node]) -> dict[fx.Node, list[str]]:
        """Float readers of int8 values read a dequantized copy; returns value -> who ended the region."""
        exits = {}
        for value, (q, params) in self.int8.items():
            readers = [u for u in value.users if u not in fused]
            if not readers:
                continue
            with self.gm.graph.inserting_after(q):
                dq = self._call(fxops.dequantize_u8.default, (q, *params), value)
            value.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not dq)
            exits[value] = [f"{u.name} ({_op_name(u)})" for u in readers]
        return exits

    def _regions(self, exits: dict[fx.Node, list[str]]) -> list[Region]:
        """Connected components of the int8 nodes (entry quantizes shared by two chains join them): the
        layers, where float enters and what ends each region."""
        parent: dict[fx.Node, fx.Node] = {}

        def find(n):
            while parent.setdefault(n, n) is not n:
                n = parent[n]
            return n

        members = set(self.origin) | set(self.entries.values())
        for q in self.origin:
            for source in q.all_input_nodes:
                if source in members:
                    parent[find(q)] = find(source)
        regions: dict[fx.Node, Region] = {}
        for node in self.gm.graph.nodes:  # graph order: region ids and node lists are topological
            if node not in members and node.target is not fxops.dequantize_u8.default:
                continue
            if node.target is fxops.dequantize_u8.default:
                if node.args[0] not in members:
                    continue
                root = find(node.args[0])
            else:
                root = find(node)
            region = regions.setdefault(root, Region({"region": len(regions), "layers": [], "enters_from": [], "ends_at": []}))
            region.int8_nodes.append(node.name)
            if node.target is fxops.quantize_u8.default:
                region.row["enters_from"].append(node.args[0].name)
            if node in self.origin:
                replaced = self.origin[node]
                region.float_nodes += [n.name for n in replaced]
                region.row["ends_at"] += exits.get(replaced[-1], [])
                if replaced[0].target in CONV_OPS:
                    region.convs.append(replaced[0].name)
                    self.lowerer.details[replaced[0].name]["region"] = region.row["region"]
        for region in regions.values():
            row = region.row
            row.update(layers=", ".join(self.lowerer.details[c]["layer"] for c in region.convs),
                       enters_from=", ".join(sorted(set(row["enters_from"]))), ends_at="; ".join(row["ends_at"]) or "-")
        return list(regions.values())

    def _call(self, target, args: tuple, origin: fx.Node) -> fx.Node:
        new = self.gm.graph.call_function(target, args)
        new.meta["nn_module_stack"] = origin.meta.get("nn_module_stack", {})
        new.meta["val"] = ir.fake_value(target, args)
        return new


def _op_name(node: fx.Node) -> str:
    if node.op == "output":
        return "graph output"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}: no int8 implementation" if node.op == "call_function" else name
