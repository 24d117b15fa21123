"""Fold inference-mode BatchNorm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
CONVS = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default,
}
TRANSPOSED_CONVS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
LINEARS = {aten.linear.default}
BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


@dataclass
class _BatchNorm:
    node: fx.Node
    output: fx.Node  # the node whose users see the normalised tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def _tensor(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    return ir.get_attr(gm, arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _match_batch_norm(gm: fx.GraphModule, node: fx.Node) -> tuple[_BatchNorm | None, str]:
    args = ir.call_arguments(node)
    mean, var = _tensor(gm, args["running_mean"]), _tensor(gm, args["running_var"])
    if mean is None or var is None:
        return None, "batch norm has no running statistics (track_running_stats=False)"
    if node.target is aten.batch_norm.default and args["training"]:
        return None, "batch norm runs in training mode (uses batch statistics)"
    output = node
    if node.target is aten._native_batch_norm_legit_no_training.default:
        getters = [u for u in node.users if u.target is operator.getitem]
        if len(getters) != len(node.users) or any(u.args[1] != 0 for u in getters) or len(getters) != 1:
            return None, "batch norm's saved statistics are used"
        output = getters[0]
    channels = mean.numel()
    gamma = _tensor(gm, args["weight"]) if args["weight"] is not None else torch.ones(channels, dtype=mean.dtype)
    beta = _tensor(gm, args["bias"]) if args["bias"] is not None else torch.zeros(channels, dtype=mean.dtype)
    if gamma is None or beta is None:
        return None, "batch norm's affine parameters are computed, not parameters"
    return _BatchNorm(node, output, gamma, beta, mean, var, float(args["eps"])), ""


def _producer_problem(gm: fx.GraphModule, producer: fx.Node, bn: fx.Node) -> str:
    """Why ``producer`` cannot absorb ``bn`` ("" if it can)."""
    if producer.op != "call_function" or producer.target not in CONVS | TRANSPOSED_CONVS | LINEARS:
        return f"input comes from {producer.target if producer.op == 'call_function' else producer.op}, not a conv/linear"
    if len(producer.users) != 1:
        return "the conv/linear output has other users besides the batch norm"
    args = ir.call_arguments(producer)
    weight, bias = args["weight"], args["bias"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "the conv/linear weight is computed, not a parameter"
    if ir.attr_use_count(gm, weight.target) != 1:
        return f"weight {weight.target!r} is used at more than one call site; folding would change the others"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr" and ir.attr_use_count(gm, bias.target) == 1):
        return "the bias is computed or shared with another call site"
    if producer.target in LINEARS and len(ir.fake_shape(producer) or ()) != 2:
        return "batch norm after a linear on a >2-D input normalises a non-feature dim"
    return ""


def _is_transposed(node: fx.Node) -> bool:
    return node.target in TRANSPOSED_CONVS or (
        node.target is aten.convolution.default and bool(ir.call_arguments(node)["transposed"])
    )


def fold_scale_into_weight(weight: torch.Tensor, scale: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """Scale output channel ``o`` of ``weight`` by ``scale[o]``.

    Conv/linear weights are ``[C_out, C_in/g, *k]``: scale dim 0. Transposed conv weights are
    ``[C_in, C_out/g, *k]``; output channel ``o = j·(C_out/g) + c`` lives in group ``j`` at column
    ``c``, so view them as ``[g, C_in/g, C_out/g, *k]`` and scale ``[g, 1, C_out/g]``.
    """
    if not transposed:
        return weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    c_in, c_out_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, c_in // groups, c_out_per_group, *kernel)
    scaled = grouped * scale.view(groups, 1, c_out_per_group, *([1] * len(kernel)))
    return scaled.reshape(weight.shape)


@register_pass
@dataclass(frozen=True)
class FoldBN(Pass):
    """``bn(conv(x, W, b)) -> conv(x, W', b')`` (also transposed conv and linear), exact in eval mode.

    With ``s = γ / sqrt(σ² + ε)``: ``W'[o] = s[o]·W[o]`` and ``b' = s·(b − μ) + β``.
    """

    name = "fold_bn"
    lossless = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in BATCH_NORMS:
                continue
            where = ir.module_path(node) or node.name
            bn, problem = _match_batch_norm(gm, node)
            producer = node.args[0]
            if bn is not None:
                problem = _producer_problem(gm, producer, node)
            if problem:
                result.skip(where, problem)
                continue
            self._fold(gm, producer, bn)
            result.rewritten.append(f"{ir.module_path(producer) or producer.name} <- {where}")
        return result

    @staticmethod
    def _fold(gm: fx.GraphModule, producer: fx.Node, bn: _BatchNorm) -> None:
        args = ir.call_arguments(producer)
        weight = ir.get_attr(gm, args["weight"].target)
        groups = int(args.get("groups") or 1)
        scale = bn.gamma.double() / torch.sqrt(bn.var.double() + bn.eps)
        # one rounding per weight element in at least fp32; no float64 copy of the weight (its peak memory)
        weight_scale = scale.to(torch.promote_types(weight.dtype, torch.float32))
        new_weight = fold_scale_into_weight(weight.detach(), weight_scale, _is_transposed(producer), groups)
        old_bias = ir.get_attr(gm, args["bias"].target).double() if args["bias"] is not None else torch.zeros_like(scale)
        new_bias = (old_bias - bn.mean.double()) * scale + bn.beta.double()
        ir.set_attr(gm, args["weight"].target, new_weight.to(weight.dtype))
        if args["bias"] is not None:
            ir.set_attr(gm, args["bias"].target, new_bias.to(weight.dtype))
        else:
            bias_node = ir.add_constant(gm, f"{args['weight'].target}_folded_bias", new_bias.to(weight.dtype), producer)
            ir.set_call_argument(producer, "bias", bias_node)
        bn.output.replace_all_uses_with(producer)
        if bn.output is not bn.node:
            gm.graph.erase_node(bn.output)
        gm.graph.erase_node(bn.node)
