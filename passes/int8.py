"""Substitute int8 GEMMs for linear layers and 1×1 convolutions (lossy).

Weights become int8, symmetric per output channel: ``W ≈ s_w ⊙ W_q`` with
``s_w[n] = max_k |W[n, k]| / 127`` and ``W_q = round(W / s_w)``. The rewrites, by scheme (one frozen
config each, ``passes/_int8_schemes.py``; ``Int8(mode=...)`` is an alias):

* ``dynamic`` (W8A8):      ``linear(x, W, b) -> int8_linear(x, W_q, s_w, b)``; ``x`` is quantized
  per token at run time, the GEMM accumulates in int32 and dequantizes by ``s_x[m]·s_w[n]``;
* ``static`` (W8A8):       ``linear(x, W, b) -> int8_linear_static(x, s_x, W_q, s_w, b)`` with the
  per-tensor ``s_x`` from :func:`fxcompress.calibrate`;
* ``weight_only`` (W8A16): ``linear(x, W, b) -> int8_weight_only_linear(x, W_q, s_w, b)``.

A following ``relu``/``gelu`` is fused into the W8A8 epilogue: ``act(linear(...)) -> int8_linear(..., act)``.
A 1×1 convolution is the same GEMM over channels:
``conv2d(x, W, b) -> permute(op(permute(x, NHWC), W_q, ...), NCHW)``.

Which implementation each rewritten node runs (``torch._int_mm``, a quantized engine's prepacked
linear, Triton, or the unrewritten float original) is measured on the machine at the node's real
shapes and the fastest within the fidelity contract wins (``passes/_int8_lowering.py``); the
candidates' timings are in the pass's ``details``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import fxcompress.ops  # noqa: F401  (registers torch.ops.fxcompress.*)
from fxcompress.ops.int8_linear import quantization_error, quantize_weight_per_channel
from fxcompress.ops.qengine import prepacked
from fxcompress import ir, selectors
from fxcompress.pass_base import PassContext, PassResult
from fxcompress.verify import node_values
from fxcompress.passes._gptq import gptq_quantize, layer_hessians, smoothed_hessian

from ._smoothquant import activation_absmax, fold_into_norm, smooth

from ._int8_conv_regions import lower_convs
from ._int8_embeddings import quantize_embeddings
from ._int8_experts import quantize_expert_gemms
from ._int8_schemes import MODES, SCHEME_CONFIGS, Int8, Int8Dynamic, Int8Static, Int8WeightOnly, Scheme, register_scheme
from ._int8_lowering import (
    FloatGroup, GemmProblem, Lowering, RowBuckets, choose_lowering, decode_problem, decode_working_set,
    insert_call, nchw_output, nhwc_input, stacked_weights,
)
from ._projections import ROUTER_REASON, gemm_arguments, is_projection, routes_experts, weight_matrix

__all__ = ["MODES", "SCHEME_CONFIGS", "GemmScheme", "Int8", "Int8Dynamic", "Int8Static", "Int8WeightOnly", "register_scheme"]

aten = torch.ops.aten
fxops = torch.ops.fxcompress
LINEAR = aten.linear.default
CONV2D = aten.conv2d.default
FUSABLE_ACTIVATIONS = {aten.relu.default: "relu", aten.gelu.default: "gelu"}


def layer_name(node: fx.Node) -> str:
    """The user-facing name of a linear/conv call: its module path (what ``skip=`` and calibration use)."""
    return ir.module_path(node) or node.name


def gemm_candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """The projections (linear, addmm/mm with a stored weight: ``_projections``) and 2-D convolution calls;
    :func:`gemm_problem` says which of them can become int8 GEMMs."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and (n.target is CONV2D or is_projection(n))]


def gemm_problem(gm: fx.GraphModule, node: fx.Node) -> str:
    """Why ``node`` cannot be rewritten as an int8 GEMM ("" if it can)."""
    args = gemm_arguments(node)
    weight = args["weight"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "the weight is computed, not a parameter"
    if not ir.get_attr(gm, weight.target).is_floating_point():
        return "the weight is not floating point"
    if node.target is CONV2D:
        return _conv_problem(node, args, ir.get_attr(gm, weight.target))
    return ""


def _conv_problem(node: fx.Node, args: dict, weight: torch.Tensor) -> str:
    if tuple(weight.shape[2:]) != (1, 1):
        return f"{weight.shape[2]}x{weight.shape[3]} conv stays float (only 1x1 convs run as int8 GEMMs)"
    if int(args["groups"]) != 1:
        return "grouped 1x1 conv stays float (not a single GEMM)"
    if tuple(args["stride"]) not in ((1, 1), (1,)) or any(int(p) for p in args["padding"]):
        return "strided or padded 1x1 conv stays float"
    if len(ir.fake_shape(node) or ()) != 4:
        return "1x1 conv on an unbatched input stays float"
    return ""


class _GemmRewrite:
    """One run of the int8 GEMM rewrite for ``config``, with its scheme's handler."""

    def __init__(self, config: Int8, scheme: "GemmScheme"):
        self.config, self.scheme = config, scheme
        self.head_tables: dict[str, tuple[fx.Node, fx.Node]] = {}  # weight -> (W_q, s_w) of its plain int8 linear
        self.decode_working_set = 0  # bytes a decoding step reads between two calls of a layer (decode timings)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        scheme, config = self.scheme, self.config
        scales = scheme.activation_scales(config)
        convs_lowered = scheme.lower_convs(gm, ctx, config, scales, result)
        eligible = []
        for node in gemm_candidates(gm):
            if convs_lowered and node.target is CONV2D:
                continue
            problem = self._problem(gm, node, layer_name(node), scales)
            if problem:
                result.skip(layer_name(node), problem)
            else:
                eligible.append(node)
        self.decode_working_set = decode_working_set(gm)
        quantize_expert_gemms(gm, ctx, config, result, self.decode_working_set)
        groups = self._sibling_groups(gm, eligible, scales)
        values = self._input_values(gm, ctx, groups)
        examples = [self._example(gm, group, values) for group in groups]  # before rewrites rename inputs
        hessians = layer_hessians(gm, ctx, [g[0] for g in groups]) if self.config.gptq else {}
        alpha = self.scheme.smoothing_alpha(self.config)
        absmax = activation_absmax(gm, ctx, [g[0] for g in groups if g[0].target is LINEAR]) if alpha is not None else {}
        for group, example in zip(groups, examples):
            calibrated = (hessians.get(group[0].name), absmax.get(group[0].name))
            details, kept_float = self._rewrite(gm, group, scales.get(layer_name(group[0])), example, calibrated)
            result.details.extend(details)
            if kept_float:
                for node in group:
                    result.skip(layer_name(node), f"kept float: {kept_float}")
            else:
                result.rewritten.extend(layer_name(n) for n in group)
        if config.embeddings:
            quantize_embeddings(gm, config.skip, self.head_tables, result)
        return result

    def _problem(self, gm: fx.GraphModule, node: fx.Node, layer: str, scales: dict) -> str:
        if selectors.first_match(self.config.skip, layer):
            return "kept in float by skip="
        problem = gemm_problem(gm, node)
        if problem:
            return problem
        if routes_experts(node):
            return ROUTER_REASON
        weight = weight_matrix(gm, node)
        if weight.numel() < self.config.min_weight_numel:
            return (f"weight has {weight.numel()} elements < min_weight_numel={self.config.min_weight_numel}: "
                    "quantizing activations costs more than the int8 GEMM saves")
        return self.scheme.layer_problem(layer, scales)

    def _sibling_groups(self, gm: fx.GraphModule, nodes: list[fx.Node], scales: dict) -> list[list[fx.Node]]:
        """Linears reading the same input (q/k/v projections) become one GEMM: ``[x W_1ᵀ | x W_2ᵀ] = x [W_1; W_2]ᵀ``.

        Only plain linears with parameter (or no) bias, no fused activation and, for static mode,
        the same activation scale are grouped; everything else is a group of one.
        """
        groups: dict[tuple, list[fx.Node]] = {}
        for node in nodes:
            bias = gemm_arguments(node)["bias"]
            fusible = (
                self.config.fuse_siblings and node.target is LINEAR and self._fused_activation(node)[0] == "none"
                and (bias is None or bias.op == "get_attr")
            )
            key = (node.args[0], scales.get(layer_name(node))) if fusible else (node,)
            groups.setdefault(key, []).append(node)
        return list(groups.values())

    @staticmethod
    def _input_values(gm: fx.GraphModule, ctx: PassContext, groups: list[list[fx.Node]]) -> dict[str, torch.Tensor]:
        """The example values of every group's input and computed bias (the real shapes the lowering is timed at)."""
        names = set()
        for group in groups:
            args = gemm_arguments(group[0])
            names.add(args["input"].name)
            if isinstance(args["bias"], fx.Node) and args["bias"].op != "get_attr":
                names.add(args["bias"].name)
        return node_values(gm, ctx.args, ctx.kwargs, names)

    def _example(self, gm: fx.GraphModule, group: list[fx.Node], values: dict) -> tuple:
        """(input value, computed bias value or None, the float candidate) of a group on the example inputs."""
        args = [gemm_arguments(node) for node in group]
        x_value = values[args[0]["input"].name]
        bias = args[0]["bias"]
        bias_value = values[bias.name] if len(group) == 1 and isinstance(bias, fx.Node) and bias.op != "get_attr" else None
        fused = self._fused_activation(group[0]) if len(group) == 1 else ("none", group[0])
        return x_value, bias_value, FloatGroup.bind(gm, group, args, values, fused)

    def _rewrite(self, gm: fx.GraphModule, group: list[fx.Node], input_scale: float | None, example: tuple,
                 calibrated: tuple = (None, None)) -> tuple[list[dict], str]:
        """Quantize and (unless float wins everywhere) rewrite ``group``: (its details, why it stays float or "")."""
        first = group[0]
        args = [gemm_arguments(node) for node in group]
        x_value, computed_bias, float_group = example
        hessian, absmax = calibrated
        weights = [weight_matrix(gm, node) for node in group]
        sigma, alpha = None, self.scheme.smoothing_alpha(self.config)
        if alpha is not None and first.target is not CONV2D:
            if absmax is None:  # not a plain linear: the example input's range
                absmax = x_value.abs().reshape(-1, x_value.shape[-1]).amax(0).float()
            sigma, weights, input_scale = smooth(alpha, weights, absmax, input_scale)
        quantized = [quantize_weight_per_channel(w.reshape(w.shape[0], -1)) if hessian is None
                     else gptq_quantize(w.reshape(w.shape[0], -1), smoothed_hessian(hessian, sigma)) for w in weights]
        weight_q = torch.cat([q for q, _ in quantized])
        weight_scale = torch.cat([s for _, s in quantized])
        bias_value = computed_bias if computed_bias is not None else self._bias_value(gm, args, weights)
        activation, output = self._fused_activation(first) if len(group) == 1 else ("none", first)
        s_x = torch.tensor([input_scale]) if input_scale is not None else None
        problem = GemmProblem(
            device=x_value.device, x=x_value, op_args=self.scheme.op_args(s_x, weight_q, weight_scale, bias_value, activation),
            float_run=float_group.at(x_value), prepare=nhwc_input(first.target is CONV2D, sigma), finish=nchw_output(first.target is CONV2D),
            key={"op": "conv1x1" if first.target is CONV2D else "linear", "x": list(x_value.shape), "N": [w.shape[0] for w in weights],
                 "dtype": str(x_value.dtype), "activation": activation, "bias": bias_value is not None, "smoothed": sigma is not None},
        )
        options = dict(tune=self.config.tune, allow_slower=self.config.allow_slower, impl=self.config.impl,
                       error_factor=self.config.error_factor, min_run_time=self.config.tune_time_s)
        lowering = choose_lowering(self.config.mode, problem, **options)
        buckets = None
        if self._decodes_apart(first, x_value, computed_bias):
            decode = self._decode_lowering(problem, float_group, lowering, options)
            buckets = RowBuckets(decode, lowering, self.config.decode_rows)
        prepacked.discard(weight_q)  # one pack per engine timed; the graph repacks for the engine it runs
        details = [
            {
                "layer": layer_name(node), "mode": self.config.mode, "op": "conv1x1" if node.target is CONV2D else "linear",
                "weight_shape": tuple(w.shape), "fused_activation": activation, "gemm_group": len(group),
                "weight_rel_error": quantization_error(w.reshape(w.shape[0], -1), q, sc),
                "smoothed": sigma is not None,
                **({"rounding": "gptq" if hessian is not None else "nearest (no input Hessian)"} if self.config.gptq else {}),
                **({"input_scale": input_scale} if input_scale is not None else {}),
                **(buckets.detail() if buckets is not None else lowering.detail()),
            }
            for node, w, (q, sc) in zip(group, weights, quantized)
        ]
        if lowering.candidate.op is None and not (buckets is not None and buckets.split):
            at_one_row = f"; at 1 row: {buckets.decode.choice.reason} ({buckets.decode.choice.timings_text() or 'not timed'})" if buckets else ""
            return details, f"{lowering.choice.reason} ({lowering.choice.timings_text() or 'not timed'}){at_one_row}"
        smoothing = self._emit(gm, group, (lowering, buckets), weights, (weight_q, weight_scale, s_x, sigma), activation, output)
        for row in details if sigma is not None else ():
            row["smoothing"] = smoothing
        return details, ""

    def _decode_lowering(self, problem: GemmProblem, float_group: FloatGroup, prefill: Lowering, options: dict) -> Lowering:
        """The choice at one row, timed with the weights cold as a decoding step reads them (:func:`cold_weight_calls`).

        Where the prefill engine is int8, its weight is stored anyway: float at decode must beat it
        measurably to earn a second, float, copy of the weight."""
        at_one_row, timed = decode_problem(problem, float_group, self.decode_working_set)
        return choose_lowering(self.config.mode, at_one_row, timed=timed, baseline=prefill.impl, **options)

    def _decodes_apart(self, first: fx.Node, x_value: torch.Tensor, computed_bias) -> bool:
        """Whether the decode engine (one row) is chosen apart from the example's: a linear of the dynamic or
        weight-only scheme (``int8_linear_by_rows`` has no calibrated input scale) on more than ``decode_rows``
        rows, with a stored bias (a computed one has the example's shape)."""
        rows = x_value.numel() // max(x_value.shape[-1], 1)
        return (self.config.decode_rows is not None and rows > self.config.decode_rows and first.target is not CONV2D
                and computed_bias is None and self.config.mode in ("dynamic", "weight_only"))

    def _emit(self, gm, group, lowerings: tuple[Lowering, RowBuckets | None], weights, tensors, activation, output) -> str:
        """Emit the op; returns how SmoothQuant's ``1/σ`` is applied (folded into a norm, or why not)."""
        first = group[0]
        lowering, buckets = lowerings
        by_rows = buckets is not None and buckets.split
        weight_q, weight_scale, s_x, sigma = tensors
        args = [gemm_arguments(node) for node in group]
        base = args[0]["weight"].target
        wq_node = ir.add_constant(gm, f"{base}_int8", weight_q, first)
        scale_node = ir.add_constant(gm, f"{base}_scale", weight_scale, first)
        s_x_node = ir.add_constant(gm, f"{base}_input_scale", s_x, first) if s_x is not None else None
        bias = self._bias(gm, group, args, weights, first)
        if len(group) == 1 and sigma is None and first.target is LINEAR and not by_rows:  # per-row W_q, s_w of the table itself
            self.head_tables[base] = (wq_node, scale_node)
        x = args[0]["input"]
        smoothing = ""
        if sigma is not None:
            inverse_value = sigma.reciprocal().to(weights[0].dtype)
            smoothing = fold_into_norm(gm, x, group, inverse_value) if self.scheme.folds_smoothing(self.config) else \
                "explicit multiply (fold_smoothing=False)"
        with gm.graph.inserting_before(first):
            if first.target is CONV2D:
                x = insert_call(gm, aten.permute.default, (x, [0, 2, 3, 1]), first)
            if sigma is not None and not smoothing.startswith("folded"):
                inverse = ir.add_constant(gm, f"{base}_smooth_inverse", sigma.reciprocal().to(weights[0].dtype), first)
                x = insert_call(gm, aten.mul.Tensor, (x, inverse), first)
            if by_rows:
                weight = ir.add_constant(gm, f"{base}_float", stacked_weights(weights), first) if buckets.needs_float_weight else None
                gemm = insert_call(gm, fxops.int8_linear_by_rows.default,
                             (x, wq_node, scale_node, bias, weight, activation, *buckets.engines(), buckets.max_decode_rows), first)
            else:
                op_args = self.scheme.op_args(s_x_node, wq_node, scale_node, bias, activation)
                gemm = insert_call(gm, lowering.candidate.op, (x, *op_args, *lowering.candidate.extra_args), first)
            if first.target is CONV2D:
                gemm = insert_call(gm, aten.permute.default, (gemm, [0, 3, 1, 2]), first)
            outputs = [gemm]
            if len(group) > 1:
                parts = insert_call(gm, aten.split_with_sizes.default, (gemm, [w.shape[0] for w in weights], -1), first)
                outputs = [insert_call(gm, operator.getitem, (parts, i), node) for i, node in enumerate(group)]  # each its layer's name
        (output if len(group) == 1 else first).replace_all_uses_with(outputs[0])
        for node, out in zip(group[1:], outputs[1:]):
            node.replace_all_uses_with(out)
        return smoothing

    @staticmethod
    def _bias_value(gm, args: list[dict], weights: list):
        if all(a["bias"] is None for a in args):
            return None
        return torch.cat([
            ir.get_attr(gm, a["bias"].target).detach() if a["bias"] is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            for a, w in zip(args, weights)
        ])

    @staticmethod
    def _bias(gm: fx.GraphModule, group: list[fx.Node], args: list[dict], weights: list, before: fx.Node):
        if len(group) == 1:
            return args[0]["bias"]
        value = _GemmRewrite._bias_value(gm, args, weights)
        return None if value is None else ir.add_constant(gm, f"{args[0]['weight'].target}_fused_bias", value, before)

    def _fused_activation(self, node: fx.Node) -> tuple[str, fx.Node]:
        """("relu"/"gelu", the activation node) when it is the sole user and can go into the epilogue."""
        users = list(node.users)
        if not self.scheme.fuses_activation(self.config) or node.target is CONV2D or len(users) != 1:
            return "none", node
        user = users[0]
        activation = FUSABLE_ACTIVATIONS.get(user.target)
        if activation is None or user.args[0] is not node or ir.call_arguments(user).get("approximate", "none") != "none":
            return "none", node
        return activation, user


class GemmScheme(Scheme):
    """The int8 GEMM rewrite every built-in scheme shares; subclasses say what differs."""

    def run(self, config: Int8, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return _GemmRewrite(config, self).run(gm, ctx)

    def activation_scales(self, config: Int8) -> dict[str, float]:
        return {}

    def lower_convs(self, gm: fx.GraphModule, ctx: PassContext, config: Int8, scales: dict, result: PassResult) -> bool:
        """Rewrite the convolutions this scheme lowers itself; True if it took every conv2d."""
        return False

    def layer_problem(self, layer: str, scales: dict) -> str:
        return ""

    def smoothing_alpha(self, config: Int8) -> float | None:
        return None

    def folds_smoothing(self, config: Int8) -> bool:
        return False

    def fuses_activation(self, config: Int8) -> bool:
        return False

    def op_args(self, input_scale, weight_q, weight_scale, bias, activation) -> tuple:
        """The op's arguments after ``x`` (graph nodes when emitting, tensors when timing)."""
        raise NotImplementedError


@register_scheme(Int8Dynamic)
class _Dynamic(GemmScheme):
    def smoothing_alpha(self, config: Int8Dynamic) -> float | None:
        return config.smooth_alpha

    def folds_smoothing(self, config: Int8Dynamic) -> bool:
        return config.fold_smoothing

    def fuses_activation(self, config: Int8Dynamic) -> bool:
        return config.fuse_activation

    def op_args(self, input_scale, weight_q, weight_scale, bias, activation) -> tuple:
        return weight_q, weight_scale, bias, activation


@register_scheme(Int8Static)
class _Static(GemmScheme):
    def smoothing_alpha(self, config: Int8Static) -> float | None:
        return config.smooth_alpha

    def folds_smoothing(self, config: Int8Static) -> bool:
        return config.fold_smoothing

    def activation_scales(self, config: Int8Static) -> dict[str, float]:
        return dict(config.activation_scales)

    def lower_convs(self, gm, ctx, config, scales, result) -> bool:
        lower_convs(gm, ctx, config, scales, result)  # every conv1d/conv2d: static int8 convs and regions
        return True

    def layer_problem(self, layer: str, scales: dict) -> str:
        return "" if layer in scales else "no calibrated activation scale for this layer (calibrate on batches that reach it)"

    def fuses_activation(self, config: Int8Static) -> bool:
        return config.fuse_activation

    def op_args(self, input_scale, weight_q, weight_scale, bias, activation) -> tuple:
        return input_scale, weight_q, weight_scale, bias, activation


@register_scheme(Int8WeightOnly)
class _WeightOnly(GemmScheme):
    def op_args(self, input_scale, weight_q, weight_scale, bias, activation) -> tuple:
        return weight_q, weight_scale, bias
