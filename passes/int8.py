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
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

import fxcompress.int8_ops  # noqa: F401  (registers torch.ops.fxcompress.*)
from fxcompress import ir
from fxcompress.errors import PassConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult, register_pass

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
    """

    name = "int8"
    lossless = False

    mode: str = "dynamic"
    skip: tuple[str, ...] = ()
    min_weight_numel: int = 65536
    activation_scales: tuple[tuple[str, float], ...] = ()
    fuse_activation: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PassConfigError(f"int8: mode must be one of {MODES}, not {self.mode!r}")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise PassConfigError(f"int8: skip must be a list of module names or globs, e.g. skip=['pooler'], not {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
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
        for node in gemm_candidates(gm):
            layer = layer_name(node)
            problem = self._problem(gm, node, layer, scales)
            if problem:
                result.skip(layer, problem)
                continue
            result.details.append(self._rewrite(gm, node, layer, scales.get(layer)))
            result.rewritten.append(layer)
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
        numel = ir.get_attr(gm, node.args[1].target).numel()
        if numel < self.min_weight_numel:
            return (f"weight has {numel} elements < min_weight_numel={self.min_weight_numel}: "
                    "quantizing activations costs more than the int8 GEMM saves")
        if self.mode == "static" and layer not in scales:
            return "no calibrated activation scale for this layer (calibrate on batches that reach it)"
        return ""

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, layer: str, input_scale: float | None) -> dict:
        args = ir.call_arguments(node)
        weight = ir.get_attr(gm, args["weight"].target)
        weight_q, weight_scale = quantize_weight_per_channel(weight.reshape(weight.shape[0], -1))
        weight_target = args["weight"].target
        wq_node = ir.add_constant(gm, f"{weight_target}_int8", weight_q, node)
        scale_node = ir.add_constant(gm, f"{weight_target}_scale", weight_scale, node)
        activation, output = self._fused_activation(node)
        x = args["input"]
        with gm.graph.inserting_before(node):
            if node.target is CONV2D:
                x = _call(gm, aten.permute.default, (x, [0, 2, 3, 1]), node)
            if self.mode == "dynamic":
                gemm = _call(gm, fxops.int8_linear.default, (x, wq_node, scale_node, args["bias"], activation), node)
            elif self.mode == "static":
                s_x = ir.add_constant(gm, f"{weight_target}_input_scale", torch.tensor([input_scale]), node)
                gemm = _call(gm, fxops.int8_linear_static.default, (x, s_x, wq_node, scale_node, args["bias"], activation), node)
            else:
                gemm = _call(gm, fxops.int8_weight_only_linear.default, (x, wq_node, scale_node, args["bias"]), node)
            if node.target is CONV2D:
                gemm = _call(gm, aten.permute.default, (gemm, [0, 3, 1, 2]), node)
        output.replace_all_uses_with(gemm)
        return {
            "layer": layer, "mode": self.mode, "op": "conv1x1" if node.target is CONV2D else "linear",
            "weight_shape": tuple(weight.shape), "fused_activation": activation,
            "weight_rel_error": relative_error(weight.reshape(weight.shape[0], -1), weight_q, weight_scale),
            **({"input_scale": input_scale} if input_scale is not None else {}),
        }

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
    new.meta["val"] = _fake_value(new)
    return new


def _fake_value(node: fx.Node):
    mode = detect_fake_mode([a.meta.get("val") for a in node.all_input_nodes])
    if mode is None:
        return None

    def fake(arg):
        value = arg.meta.get("val")
        if value is None and arg.op == "get_attr":
            value = ir.get_attr(arg.graph.owning_module, arg.target)
        return value if isinstance(value, FakeTensor) or not isinstance(value, torch.Tensor) else mode.from_tensor(value)

    with mode, enable_python_dispatcher():  # symbolic (dynamic-batch) shapes need the Python meta kernels
        return node.target(*fx.node.map_arg(node.args, fake))
