"""Substitute int8 GEMMs for linear layers and 1×1 convolutions (lossy).

Weights become int8, symmetric per output channel: ``W ≈ s_w ⊙ W_q`` with
``s_w[n] = max_k |W[n, k]| / 127`` and ``W_q = round(W / s_w)``. The rewrites, by ``mode``:

* ``dynamic`` (W8A8):      ``linear(x, W, b) -> int8_linear(x, W_q, s_w, b)``; ``x`` is quantized
  per token at run time, the GEMM accumulates in int32 and dequantizes by ``s_x[m]·s_w[n]``;
* ``static`` (W8A8):       ``linear(x, W, b) -> int8_linear_static(x, s_x, W_q, s_w, b)`` with the
  per-tensor ``s_x`` from :func:`fxcompress.calibrate`;
* ``weight_only`` (W8A16): ``linear(x, W, b) -> int8_weight_only_linear(x, W_q, s_w, b)``.

A following ``relu``/``gelu`` is fused into the W8A8 epilogue: ``act(linear(...)) -> int8_linear(..., act)``.
A 1×1 convolution is the same GEMM over channels:
``conv2d(x, W, b) -> permute(op(permute(x, NHWC), W_q, ...), NCHW)``.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

import fxcompress.int8_ops  # noqa: F401  (registers torch.ops.fxcompress.*)
from fxcompress import ir
from fxcompress.errors import PassConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult, register_pass
from fxcompress.verify import node_values
from fxcompress.passes._gptq import gptq_quantize, layer_hessians, smoothed_hessian

aten = torch.ops.aten
fxops = torch.ops.fxcompress
MODES = ("dynamic", "weight_only", "static")
LINEAR = aten.linear.default
CONV2D = aten.conv2d.default
FUSABLE_ACTIVATIONS = {aten.relu.default: "relu", aten.gelu.default: "gelu"}


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K] -> (W_q int8, s_w fp32 [N])`` with ``W ≈ s_w[:, None] · W_q``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def relative_error(weight: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor) -> float:
    """``‖W − s_w ⊙ W_q‖_F / ‖W‖_F``."""
    w = weight.detach().double()
    return ((w - weight_q.double() * scale.double()[:, None]).norm() / w.norm().clamp(min=1e-30)).item()


def layer_name(node: fx.Node) -> str:
    """The user-facing name of a linear/conv call: its module path (what ``skip=`` and calibration use)."""
    return ir.module_path(node) or node.name


def gemm_candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """The linear and 2-D convolution calls; :func:`gemm_problem` says which of them can become int8 GEMMs."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (LINEAR, CONV2D)]


def gemm_problem(gm: fx.GraphModule, node: fx.Node) -> str:
    """Why ``node`` cannot be rewritten as an int8 GEMM ("" if it can)."""
    args = ir.call_arguments(node)
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


@register_pass
@dataclass(frozen=True)
class Int8(Pass):
    """Int8 linear layers and 1×1 convs (see the module docstring for the rewrite equations).

    ``skip``: module names or globs (``"encoder.layer.0.*"``) kept in float. ``min_weight_numel``:
    smaller weights stay float (per-token quantization and dequantization cost more than the
    int8 GEMM saves). ``activation_scales``: ``(layer, s_x)`` pairs from :func:`fxcompress.calibrate`,
    required by ``mode="static"``. ``fuse_activation``: fold a following relu/gelu into the epilogue.
    ``fuse_siblings``: linears that read the same input run as one GEMM. ``allow_slower``: also
    rewrite layers whose int8 form is known to be slower than float on their device (fp32
    weight-only on the CPU); by default they stay float with the reason. ``smooth_alpha``
    (dynamic W8A8 linears): SmoothQuant — migrate activation outliers into the weights with per-input-channel
    ``σ_j = max|X_j|^α / max|W_j|^(1−α)`` measured on the example inputs:
    ``x Wᵀ = (x / σ)(W · σ)ᵀ``, so ``x / σ`` quantizes per token with less error.
    ``gptq``: round weights with GPTQ on the calibration inputs' Hessian ``XᵀX`` (``passes/_gptq.py``)
    instead of to nearest; layers without a Hessian (too many input features) round to nearest.
    """

    name = "int8"
    lossless = False

    mode: str = "dynamic"
    skip: tuple[str, ...] = ()
    min_weight_numel: int = 65536
    activation_scales: tuple[tuple[str, float], ...] = ()
    fuse_activation: bool = True
    fuse_siblings: bool = True
    allow_slower: bool = False
    smooth_alpha: float | None = None
    gptq: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PassConfigError(f"int8: mode must be one of {MODES}, not {self.mode!r}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise PassConfigError(f"int8: skip must be a list of module names or globs, e.g. skip=['pooler'], not {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.smooth_alpha is not None and not (0.0 <= self.smooth_alpha <= 1.0):
            raise PassConfigError(f"int8: smooth_alpha must be in [0, 1] (typically 0.5), not {self.smooth_alpha!r}")
        if self.smooth_alpha is not None and self.mode != "dynamic":
            raise PassConfigError(
                "int8: smooth_alpha needs mode='dynamic' (weight_only keeps activations float; static scales "
                "are calibrated on unsmoothed activations)"
            )
        if not isinstance(self.min_weight_numel, int) or self.min_weight_numel < 0:
            raise PassConfigError(f"int8: min_weight_numel must be an integer >= 0, not {self.min_weight_numel!r}")
        object.__setattr__(self, "activation_scales", self._checked_scales())
        if self.mode == "static" and not self.activation_scales:
            raise PassConfigError(
                "int8: mode='static' needs activation_scales; compute them with "
                "`scales = fxcompress.calibrate(model, batches)` and pass Int8(mode='static', activation_scales=scales)"
            )

    def _checked_scales(self) -> tuple[tuple[str, float], ...]:
        pairs = tuple(self.activation_scales.items()) if isinstance(self.activation_scales, dict) else self.activation_scales
        try:
            checked = tuple((str(name), float(scale)) for name, scale in pairs)
        except (TypeError, ValueError) as exc:
            raise PassConfigError(f"int8: activation_scales must be (layer, scale) pairs from fxcompress.calibrate: {exc}") from exc
        bad = [(n, s) for n, s in checked if not (math.isfinite(s) and s > 0)]
        if bad:
            raise PassConfigError(f"int8: activation scales must be finite and > 0; got {bad[:3]} (calibrate on non-degenerate batches)")
        return checked

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        scales = dict(self.activation_scales)
        eligible = []
        for node in gemm_candidates(gm):
            problem = self._problem(gm, node, layer_name(node), scales)
            if problem:
                result.skip(layer_name(node), problem)
            else:
                eligible.append(node)
        groups = self._sibling_groups(gm, eligible, scales)
        activation_absmax = self._activation_absmax(gm, ctx, groups)
        smoothing = [activation_absmax.get(g[0].args[0].name) for g in groups]  # before rewrites rename inputs
        hessians = layer_hessians(gm, ctx, [g[0] for g in groups]) if self.gptq else {}
        for group, absmax in zip(groups, smoothing):
            result.details.extend(self._rewrite(gm, group, scales.get(layer_name(group[0])), absmax, hessians.get(group[0].name)))
            result.rewritten.extend(layer_name(n) for n in group)
        result.changed = bool(result.rewritten)
        if result.changed:
            ir.finalize(gm)
        return result

    def _problem(self, gm: fx.GraphModule, node: fx.Node, layer: str, scales: dict) -> str:
        if any(layer == pattern or fnmatch.fnmatchcase(layer, pattern) for pattern in self.skip):
            return "kept in float by skip="
        problem = gemm_problem(gm, node)
        if problem:
            return problem
        weight = ir.get_attr(gm, node.args[1].target)
        if weight.numel() < self.min_weight_numel:
            return (f"weight has {weight.numel()} elements < min_weight_numel={self.min_weight_numel}: "
                    "quantizing activations costs more than the int8 GEMM saves")
        if self.mode == "weight_only" and weight.device.type == "cpu" and weight.dtype == torch.float32 and not self.allow_slower:
            return ("weight_only on the CPU with fp32 activations would be slower than fp32 (ATen has no fast "
                    "int8-weight x fp32 GEMM): use mode='dynamic', a bf16/fp16 model, or allow_slower=True")
        if self.mode == "static" and layer not in scales:
            return "no calibrated activation scale for this layer (calibrate on batches that reach it)"
        return ""

    def _sibling_groups(self, gm: fx.GraphModule, nodes: list[fx.Node], scales: dict) -> list[list[fx.Node]]:
        """Linears reading the same input (q/k/v projections) become one GEMM: ``[x W_1ᵀ | x W_2ᵀ] = x [W_1; W_2]ᵀ``.

        Only plain linears with parameter (or no) bias, no fused activation and, for static mode,
        the same activation scale are grouped; everything else is a group of one.
        """
        groups: dict[tuple, list[fx.Node]] = {}
        for node in nodes:
            bias = ir.call_arguments(node)["bias"]
            fusible = (
                self.fuse_siblings and node.target is LINEAR and self._fused_activation(node)[0] == "none"
                and (bias is None or bias.op == "get_attr")
            )
            key = (node.args[0], scales.get(layer_name(node))) if fusible else (node,)
            groups.setdefault(key, []).append(node)
        return list(groups.values())

    def _activation_absmax(self, gm: fx.GraphModule, ctx: PassContext, groups: list[list[fx.Node]]) -> dict[str, torch.Tensor]:
        """Per-channel max|x| of each linear group's input on the example inputs (for ``smooth_alpha``)."""
        if self.smooth_alpha is None:
            return {}
        inputs = {g[0].args[0].name for g in groups if g[0].target is LINEAR}
        values = node_values(gm, ctx.args, ctx.kwargs, inputs)
        return {name: v.abs().reshape(-1, v.shape[-1]).amax(0).float() for name, v in values.items()}

    def _smoothing(self, weights: list[torch.Tensor], activation_absmax: torch.Tensor) -> torch.Tensor:
        weight_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
        sigma = activation_absmax.pow(self.smooth_alpha) / weight_absmax.pow(1 - self.smooth_alpha)
        return torch.where((activation_absmax > 0) & (weight_absmax > 0), sigma, torch.ones_like(sigma)).clamp(1e-5, 1e5)

    def _rewrite(self, gm: fx.GraphModule, group: list[fx.Node], input_scale: float | None, activation_absmax=None, hessian=None) -> list[dict]:
        first = group[0]
        args = [ir.call_arguments(node) for node in group]
        weights = [ir.get_attr(gm, a["weight"].target) for a in args]
        sigma = self._smoothing(weights, activation_absmax) if activation_absmax is not None else None
        if sigma is not None:
            weights = [w * sigma.to(w.dtype) for w in weights]
        quantized = [quantize_weight_per_channel(w.reshape(w.shape[0], -1)) if hessian is None
                     else gptq_quantize(w.reshape(w.shape[0], -1), smoothed_hessian(hessian, sigma)) for w in weights]
        weight_q = torch.cat([q for q, _ in quantized])
        weight_scale = torch.cat([s for _, s in quantized])
        base = args[0]["weight"].target
        wq_node = ir.add_constant(gm, f"{base}_int8", weight_q, first)
        scale_node = ir.add_constant(gm, f"{base}_scale", weight_scale, first)
        bias = self._bias(gm, group, args, weights, first)
        activation, output = self._fused_activation(first) if len(group) == 1 else ("none", first)
        x = args[0]["input"]
        with gm.graph.inserting_before(first):
            if first.target is CONV2D:
                x = _call(gm, aten.permute.default, (x, [0, 2, 3, 1]), first)
            if sigma is not None:
                inverse = ir.add_constant(gm, f"{base}_smooth_inverse", sigma.reciprocal().to(weights[0].dtype), first)
                x = _call(gm, aten.mul.Tensor, (x, inverse), first)
            if self.mode == "dynamic":
                gemm = _call(gm, fxops.int8_linear.default, (x, wq_node, scale_node, bias, activation), first)
            elif self.mode == "static":
                s_x = ir.add_constant(gm, f"{base}_input_scale", torch.tensor([input_scale]), first)
                gemm = _call(gm, fxops.int8_linear_static.default, (x, s_x, wq_node, scale_node, bias, activation), first)
            else:
                gemm = _call(gm, fxops.int8_weight_only_linear.default, (x, wq_node, scale_node, bias), first)
            if first.target is CONV2D:
                gemm = _call(gm, aten.permute.default, (gemm, [0, 3, 1, 2]), first)
            outputs = [gemm]
            if len(group) > 1:
                parts = _call(gm, aten.split_with_sizes.default, (gemm, [w.shape[0] for w in weights], -1), first)
                outputs = [_call(gm, operator.getitem, (parts, i), first) for i in range(len(group))]
        (output if len(group) == 1 else first).replace_all_uses_with(outputs[0])
        for node, out in zip(group[1:], outputs[1:]):
            node.replace_all_uses_with(out)
        return [
            {
                "layer": layer_name(node), "mode": self.mode, "op": "conv1x1" if node.target is CONV2D else "linear",
                "weight_shape": tuple(w.shape), "fused_activation": activation, "gemm_group": len(group),
                "weight_rel_error": relative_error(w.reshape(w.shape[0], -1), q, sc),
                "smoothed": sigma is not None,
                **({"rounding": "gptq" if hessian is not None else "nearest (no input Hessian)"} if self.gptq else {}),
                **({"input_scale": input_scale} if input_scale is not None else {}),
            }
            for node, w, (q, sc) in zip(group, weights, quantized)
        ]

    @staticmethod
    def _bias(gm: fx.GraphModule, group: list[fx.Node], args: list[dict], weights: list, before: fx.Node):
        if len(group) == 1:
            return args[0]["bias"]
        if all(a["bias"] is None for a in args):
            return None
        parts = [
            ir.get_attr(gm, a["bias"].target).detach() if a["bias"] is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            for a, w in zip(args, weights)
        ]
        return ir.add_constant(gm, f"{args[0]['weight'].target}_fused_bias", torch.cat(parts), before)

    def _fused_activation(self, node: fx.Node) -> tuple[str, fx.Node]:
        """("relu"/"gelu", the activation node) when it is the sole user and can go into the epilogue."""
        users = list(node.users)
        if not self.fuse_activation or self.mode == "weight_only" or node.target is CONV2D or len(users) != 1:
            return "none", node
        user = users[0]
        activation = FUSABLE_ACTIVATIONS.get(user.target)
        if activation is None or user.args[0] is not node or ir.call_arguments(user).get("approximate", "none") != "none":
            return "none", node
        return activation, user


def _call(gm: fx.GraphModule, target, args: tuple, origin: fx.Node) -> fx.Node:
    """Insert ``target(*args)`` with ``origin``'s module stack and a fake value computed from its inputs."""
    new = gm.graph.call_function(target, args)
    new.meta["nn_module_stack"] = origin.meta.get("nn_module_stack", {})
    new.meta["val"] = ir.fake_value(target, args)
    return new
