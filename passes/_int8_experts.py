"""int8 expert GEMMs of mixture-of-experts layers (``Int8`` dynamic / weight-only modes).

transformers writes the experts of Mixtral, Qwen2-MoE, Qwen3-MoE (and every class under its
``use_experts_implementation``) as 3-D parameters ``[experts, N, K]`` (``[experts, K, N]`` when
``is_transposed``) read by one grouped GEMM over the routed tokens sorted by expert; captured, that is
``transformers.grouped_mm_fallback(x, W.transpose(-2, -1), offsets)`` (fp32 under export) or
``aten._grouped_mm(x, W, offsets)``. Each becomes ``fxcompress::int8_grouped_linear(x, W_q, s_w, offsets,
small, large, rows)``: ``W_q`` int8 per expert and output channel, the engine per expert by its row count.

The engines are chosen as the linears' are (``_int8_lowering.measured_choice``: fidelity contract, then
interleaved timing with ``float`` in the race unless ``allow_slower``): once at one row per expert (a
decoding step: one expert's weight, timed cold as the step reads it, ``_int8_lowering.cold_weight_calls``)
and once at the example's rows per expert. Float at the example's rows becomes ``dequantize`` (the layer
stores only int8); float at one row keeps the layer float, with the reason (the float weight would have to
stay next to the int8 one), and only where it measurably beats the prefill's int8 engine. The router stays float (``_projections.routes_experts``).
Other batched expert forms (bmm over gathered weights, loops) stay float and are listed by their op.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.fx as fx

import fxcompress.ops  # noqa: F401  (registers torch.ops.fxcompress.*)
from fxcompress import ir, selectors, tuning
from fxcompress.ops import qengine
from fxcompress.ops.int8_experts import quantize_experts
from fxcompress.ops.int8_linear import quantization_error
from fxcompress.pass_base import PassResult
from fxcompress.verify import node_values

from ._int8_lowering import Lowering, RowBuckets, cold_key, cold_weight_calls, measured_choice, tensor_bytes
from ._projections import batched_weight_readers

aten = torch.ops.aten
GROUPED_GEMMS = ("transformers.grouped_mm_fallback", "aten._grouped_mm")
FAMILIES = {"dynamic": "int8_experts_dynamic", "weight_only": "int8_experts_weight_only"}
SCHEME = {"dynamic": "int_mm", "weight_only": "int8_weight_only"}  # the candidate computing the mode's own scheme


@dataclass
class ExpertProblem:
    """One grouped expert GEMM at real shapes: routed rows ``x [S, K]``, ``offsets [E]``, the int8 weight, the float original."""

    device: torch.device
    x: torch.Tensor
    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    offsets: torch.Tensor
    float_operand: torch.Tensor  # the float weight as the original op reads it
    float_op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    key: dict = field(default_factory=dict)

    def float_run(self) -> torch.Tensor:
        return self.float_op(self.x, self.offsets)


def _engine_candidate(name: str, available=lambda p: True) -> tuning.Candidate:
    def run(p: ExpertProblem):
        return torch.ops.fxcompress.int8_grouped_linear(p.x, p.weight_q, p.weight_scale, p.offsets, name, name, 0)

    return tuning.Candidate(name=name, run=run, available=available)


def _static_rule(problem: ExpertProblem, names: list[str]) -> str:
    preferred = ["qengine:fbgemm", "qengine:x86", "qengine:qnnpack"] if problem.device.type == "cpu" else []
    return next((n for n in preferred if n in names), "float")


def _register() -> None:
    for mode, name in FAMILIES.items():
        tuning.family(name, _static_rule)
        tuning.register_candidate(name, tuning.Candidate(name="float", run=lambda p: p.float_run()))
        tuning.register_candidate(name, _engine_candidate(SCHEME[mode]))
    for engine in qengine.QUANTIZED_ENGINES:
        available = lambda p, engine=engine: p.device.type == "cpu" and qengine.engine_available(engine)
        tuning.register_candidate(FAMILIES["dynamic"], _engine_candidate(f"qengine:{engine}", available))


_register()


def grouped_expert_gemm(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, bool] | None:
    """(get_attr of the stored expert weight, stored as ``[E, K, N]``) of a grouped expert GEMM without bias."""
    if node.op != "call_function" or str(getattr(node.target, "overloadpacket", node.target)) not in GROUPED_GEMMS:
        return None
    args = list(node.args) + [None] * 5
    if any(a is not None for a in args[3:5]) or any(v is not None for k, v in node.kwargs.items() if k != "offs"):
        return None  # a bias or an output dtype inside the op
    operand = args[1]
    transposed = isinstance(operand, fx.Node) and operand.op == "get_attr"
    if not transposed:
        swaps = isinstance(operand, fx.Node) and (
            (operand.target is aten.transpose.int and sorted(d % 3 for d in operand.args[1:]) == [1, 2])
            or (operand.target is aten.permute.default and [d % 3 for d in operand.args[1]] == [0, 2, 1]))
        operand = operand.args[0] if swaps else None
    if not (isinstance(operand, fx.Node) and operand.op == "get_attr"):
        return None
    value = ir.get_attr(gm, operand.target)
    return (operand, transposed) if value.is_floating_point() and value.dim() == 3 else None


def quantize_expert_gemms(gm: fx.GraphModule, ctx, config, result: PassResult, decode_working_set: int) -> None:
    """Rewrite every grouped expert GEMM (see the module docstring); list the expert weights left float.
    ``decode_working_set``: the bytes a decoding step reads between two calls of a layer (decode timings)."""
    found = [(node, *match) for node in gm.graph.nodes if (match := grouped_expert_gemm(gm, node)) is not None]
    handled = {weight.target for _, weight, _ in found}
    for weight, op in batched_weight_readers(gm):
        if weight not in handled:
            result.skip(weight, f"batched (mixture-of-experts) weights read by {op} stay float: only grouped expert GEMMs "
                                "(transformers' grouped_mm experts) become int8")
    if not found:
        return
    if config.mode not in FAMILIES:
        for _, weight, _ in found:
            result.skip(weight.target, f"mode={config.mode!r} has no calibrated input scale per expert: experts stay float "
                                       "(mode='dynamic' or 'weight_only' makes them int8)")
        return
    values = node_values(gm, ctx.args, ctx.kwargs, {n.args[0].name for n, _, _ in found} | {_offsets(n).name for n, _, _ in found})
    for node, weight, transposed in found:
        if selectors.first_match(config.skip, weight.target):
            result.skip(weight.target, "kept in float by skip=")
            continue
        stored = ir.get_attr(gm, weight.target)
        weight_nk = stored.transpose(-2, -1) if transposed else stored
        detail, kept_float = _rewrite(gm, node, (weight.target, weight_nk), values, config, decode_working_set)
        result.details.append({"layer": weight.target, **detail})
        if kept_float:
            result.skip(weight.target, f"kept float: {kept_float}")
        else:
            result.rewritten.append(weight.target)


def _offsets(node: fx.Node) -> fx.Node:
    return node.args[2] if len(node.args) > 2 else node.kwargs["offs"]


def _rewrite(gm: fx.GraphModule, node: fx.Node, weight: tuple[str, torch.Tensor], values: dict, config,
             working_set: int) -> tuple[dict, str]:
    """Quantize one grouped GEMM's experts and (unless float wins at one row) rewrite it: (its details, why it stays float or "")."""
    base, weight_nk = weight
    weight_q, weight_scale = quantize_experts(weight_nk)
    x, offsets = values[node.args[0].name], values[_offsets(node).name]
    target, operand = node.target, weight_nk.detach().transpose(-2, -1)
    problem = ExpertProblem(x.device, x, weight_q, weight_scale, offsets, operand, lambda rows, offs: target(rows, operand, offs),
                            {"op": "grouped_linear", "x": list(x.shape), "experts": list(weight_nk.shape), "dtype": str(x.dtype)})
    prefill = _choose(config, problem)
    rows_per_expert = int(torch.diff(offsets, prepend=offsets.new_zeros(1)).max())
    decodes_apart = config.decode_rows is not None and rows_per_expert > config.decode_rows
    decode = _choose(config, *_one_row(problem, target, working_set), baseline=prefill.impl) if decodes_apart else prefill
    buckets = RowBuckets(decode, prefill, config.decode_rows or rows_per_expert)
    detail = {"mode": config.mode, "op": "grouped_linear", "weight_shape": tuple(weight_nk.shape),
              "weight_rel_error": quantization_error(weight_nk.reshape(-1, weight_nk.shape[-1]), weight_q.reshape(-1, weight_q.shape[-1]),
                                                     weight_scale.reshape(-1)),
              **(buckets.detail() if decode is not prefill else prefill.detail())}
    if "row_dispatch" in detail:
        detail["row_dispatch"] = detail["row_dispatch"].replace("int8_linear_by_rows", "int8_grouped_linear (rows per expert)")
    if decode.impl == "float":
        why = ""
        if prefill.impl != "float":
            why = "; int8 wins only above one row, and decoding would need the float weight kept"
            detail.update(impl="float", decode_impl="float", prefill_winner=prefill.impl)
        return detail, f"{decode.choice.reason} ({decode.choice.timings_text() or 'not timed'}){why}"
    small, large = buckets.engines() if decode is not prefill else (decode.impl, decode.impl)
    with gm.graph.inserting_before(node):
        args = (node.args[0], ir.add_constant(gm, f"{base}_int8", weight_q, node),
                ir.add_constant(gm, f"{base}_scale", weight_scale, node), _offsets(node), small, large, buckets.max_decode_rows)
        new = gm.graph.call_function(torch.ops.fxcompress.int8_grouped_linear.default, args)
    new.meta.update(nn_module_stack=node.meta.get("nn_module_stack", {}), val=node.meta.get("val"))
    node.replace_all_uses_with(new)
    return detail, ""


def _one_row(problem: ExpertProblem, target, working_set: int) -> tuple[ExpertProblem, Callable]:
    """A decoding step as one expert sees it (one routed row, that expert's weight), and what to time for
    it: the weight cold, as the step reads it (``_int8_lowering.cold_weight_calls``)."""
    weight_q, weight_scale, operand = problem.weight_q[:1], problem.weight_scale[:1], problem.float_operand[:1]
    one = replace(problem, x=problem.x[:1], offsets=problem.offsets.new_ones(1), weight_q=weight_q, weight_scale=weight_scale,
                  float_operand=operand, float_op=lambda rows, offs: target(rows, operand, offs),
                  key={**problem.key, "x": [1, problem.x.shape[-1]], **cold_key(working_set)})

    def copies(candidate: tuning.Candidate) -> tuple[Callable, int]:
        if candidate.name == "float":
            def copy():
                fresh = operand.clone()
                return replace(one, float_operand=fresh, float_op=lambda rows, offs: target(rows, fresh, offs))
            return copy, tensor_bytes([operand])
        return (lambda: replace(one, weight_q=weight_q.clone(), weight_scale=weight_scale.clone())), tensor_bytes([weight_q, weight_scale])

    return one, cold_weight_calls(one, copies, working_set)


def _choose(config, problem: ExpertProblem, timed: Callable | None = None, baseline: str = "float") -> Lowering:
    scheme = SCHEME[config.mode]
    return measured_choice(
        FAMILIES[config.mode], problem, problem.key, scheme=f"{config.mode} scheme",
        scheme_error=lambda errors, _: errors.get(scheme, min(errors.values(), default=0.0)), tune=config.tune,
        allow_slower=config.allow_slower, impl=config.impl, error_factor=config.error_factor, min_run_time=config.tune_time_s,
        timed=timed, baseline=baseline)
