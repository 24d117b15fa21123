"""Projections: the GEMMs ``y = x Wᵀ + b`` with a stored weight, in every form the IR holds them.

* ``aten.linear(x, W, b)``, ``W`` stored as ``[N, K]``;
* ``aten.addmm(b, x, W)`` / ``aten.mm(x, W)`` / ``aten.matmul(x, W)`` with a 2-D parameter ``W``
  stored as ``[K, N]`` (Hugging Face ``Conv1D``: GPT-2, GPT-J-style checkpoints), or read through
  ``t``/``transpose``/``permute`` of a ``[N, K]`` parameter (``x @ W.T``).

:func:`gemm_arguments` gives every form the names of ``aten.linear`` (``input``, ``weight``, ``bias``;
``weight`` is the ``get_attr`` node of the stored tensor), :func:`weight_matrix` the ``[N, K]`` matrix
(a transposed view for the ``[K, N]`` forms), so a pass that rewrites linears rewrites them all: the
replacement of a projection node computes ``x Wᵀ + b`` on the node's own (2-D for addmm/mm) input.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxcompress import ir

aten = torch.ops.aten
LINEAR = aten.linear.default
_MATMULS = (aten.addmm.default, aten.mm.default, aten.matmul.default)
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)
_LAYOUT = {f"aten.{op}" for op in "t transpose permute view reshape contiguous to _to_copy clone".split()}
_BATCHED_GEMMS = {"aten.bmm", "aten.matmul", "aten.einsum", "aten.baddbmm", "aten._grouped_mm"}
_ROUTING_PATH = _LAYOUT | {"aten.softmax", "aten._softmax", "aten.sigmoid", "aten.log_softmax"}
ROUTER_REASON = ("the mixture-of-experts router (its output picks the experts by topk) stays float: "
                 "a flipped top-k choice sends a token to another expert")


def is_projection(node: fx.Node) -> bool:
    """A linear call, or an addmm/mm/matmul whose right operand is a stored 2-D weight (possibly transposed)."""
    if node.op != "call_function":
        return False
    return node.target is LINEAR or (node.target in _MATMULS and _stored_weight(node) is not None)


def gemm_arguments(node: fx.Node) -> dict:
    """``ir.call_arguments`` of a linear/conv node; for the matmul forms the same names (``input``,
    ``weight`` = the stored tensor's get_attr node, ``bias``) plus ``transposed`` (stored ``[K, N]``)."""
    if node.target not in _MATMULS:
        return {**ir.call_arguments(node), "transposed": False}
    weight, transposed = _stored_weight(node)
    args = ir.call_arguments(node)
    bias = args["self"] if node.target is aten.addmm.default else None
    return {"input": args["mat1"] if node.target is aten.addmm.default else args["self"],
            "weight": weight, "bias": bias, "transposed": transposed}


def weight_matrix(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The weight of a projection as ``[N, K]`` (output features first), a view of the stored tensor."""
    args = gemm_arguments(node)
    weight = ir.get_attr(gm, args["weight"].target)
    return weight.T if args["transposed"] else weight


def _stored_weight(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """(get_attr node, stored as [K, N]) of a matmul-form node's right operand, if it is a stored 2-D tensor."""
    args = ir.call_arguments(node)
    if node.target is aten.addmm.default:
        if args["beta"] != 1 or args["alpha"] != 1:
            return None
        operand = args["mat2"]
    else:
        operand = args["mat2"] if node.target is aten.mm.default else args["other"]
    if not isinstance(operand, fx.Node):
        return None
    if operand.op == "get_attr":
        return (operand, True) if len(_shape(operand)) == 2 else None
    source = operand.args[0] if operand.target in _TRANSPOSES else None
    if isinstance(source, fx.Node) and source.op == "get_attr" and len(_shape(source)) == 2 and _swaps_2d(operand):
        return source, False
    return None


def _swaps_2d(node: fx.Node) -> bool:
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    return True  # t, or transpose of a 2-D tensor (its two dims)


def _shape(node: fx.Node) -> tuple:
    value = ir.get_attr(node.graph.owning_module, node.target)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def batched_weight_readers(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(parameter, op) for stored weights of 3+ dims read by a batched GEMM (bmm/matmul/einsum/grouped_mm)
    or a custom op: the expert GEMMs of mixture-of-experts layers (``[experts, N, K]``)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = ir.get_attr(gm, node.target)
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 3):
            continue
        for user in _through_layout(node):
            name = str(getattr(user.target, "overloadpacket", user.target))
            if user.op == "call_function" and (name in _BATCHED_GEMMS or not name.startswith("aten.")):
                found.append((node.target, name))
    return found


def routes_experts(node: fx.Node, depth: int = 6) -> bool:
    """True for a projection whose output picks experts: ``topk`` of it, through softmax/sigmoid, casts and views
    (the router of a mixture-of-experts layer; Mixtral, Qwen-MoE, DeepSeek-style)."""
    frontier = [node]
    for _ in range(depth):
        users = [user for n in frontier for user in n.users]
        names = [str(getattr(user.target, "overloadpacket", "")) for user in users]
        if "aten.topk" in names:
            return True
        frontier = [user for user, name in zip(users, names) if name in _ROUTING_PATH]
    return False


def _through_layout(node: fx.Node) -> list[fx.Node]:
    """The users of ``node``, looking through transposes, views and casts."""
    readers = []
    for user in node.users:
        name = str(getattr(user.target, "overloadpacket", ""))
        readers += _through_layout(user) if name in _LAYOUT else [user]
    return readers
