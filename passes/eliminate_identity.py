"""Drop ops that return their input unchanged at inference: eval-mode dropout, alias, no-op casts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.pass_base import Pass, PassContext, PassResult, register_pass

aten = torch.ops.aten
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.type_as.default}


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _DROPOUTS:
        args = ir.call_arguments(node)
        return not args["train"] or args["p"] == 0
    if node.target is aten.alias.default:
        return True
    if node.target in _CASTS:
        source, result = node.args[0].meta.get("val"), node.meta.get("val")
        return (
            isinstance(source, torch.Tensor) and isinstance(result, torch.Tensor)
            and source.dtype == result.dtype and source.device == result.device
            and not node.kwargs.get("copy", False) and node.kwargs.get("memory_format") is None
        )
    return False


@register_pass
@dataclass(frozen=True)
class EliminateIdentity(Pass):
    """``dropout(x, p, train=False) -> x``, ``alias(x) -> x``, ``x.to(x.dtype) -> x``; then dead code.

    Exact: each removed op returns a tensor equal to its input.
    """

    name = "eliminate_identity"
    lossless = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(gm.graph.nodes):
            if _is_identity(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                result.rewritten.append(f"{node.name} ({node.target})")
        dead_before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        removed_dead = dead_before - len(gm.graph.nodes)
        if removed_dead:
            result.rewritten.append(f"{removed_dead} dead node(s)")
        return result

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [node.name for node in gm.graph.nodes if _is_identity(node)]
        if left:
            raise AssertionError(f"identity ops left in the graph: {left}")
