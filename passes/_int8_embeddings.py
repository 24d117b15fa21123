"""Weight-only int8 embedding tables (``Int8(embeddings=True)``): ``embedding(W, ids) -> int8_embedding(ids, W_q, s_w)``.

A lookup reads only the rows it gathers, so an int8 table saves bytes, not time: the option is for size
(a decoder's token table and LM head are most of a small model's weights). Rows are quantized like a
linear's output channels, ``s_w[v] = max_d |W[v, d]| / 127`` — exactly the LM head's scale when the head
reads the same table, so a tied embedding / LM head keeps **one** int8 table: the lookup reads the
``W_q, s_w`` the GEMM rewrite made for the head (a plain ``linear`` without SmoothQuant, whose ``W·σ`` is
another matrix). A table still read in float by another node (a tied head kept float because it measured
faster) stays float, with that reason: an int8 copy next to it would add bytes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxcompress import ir, selectors
from fxcompress.ops.int8_linear import quantization_error, quantize_weight_per_channel
from fxcompress.pass_base import PassResult

EMBEDDING = torch.ops.aten.embedding.default


def quantize_embeddings(gm: fx.GraphModule, skip: tuple[str, ...], head_tables: dict[str, tuple[fx.Node, fx.Node]],
                        result: PassResult) -> None:
    """Rewrite every ``aten.embedding`` whose table is a float parameter; ``head_tables`` maps a weight's
    get_attr target to the (``W_q``, ``s_w``) nodes of the int8 linear made from it (tied LM head)."""
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is EMBEDDING]:
        layer, table = ir.module_path(node) or node.name, node.args[0]
        problem = _problem(gm, node, table, skip, layer, head_tables)
        if problem:
            result.skip(layer, problem)
            continue
        weight = ir.get_attr(gm, table.target)
        shared = head_tables.get(table.target)
        if shared is None:
            weight_q, scale = quantize_weight_per_channel(weight)
            wq_node, scale_node = (ir.add_constant(gm, f"{table.target}_{suffix}", value, node)
                                   for suffix, value in (("int8", weight_q), ("scale", scale)))
        else:  # the head's tensors, read again here (its get_attr nodes come after the lookup)
            with gm.graph.inserting_before(node):
                wq_node, scale_node = (gm.graph.get_attr(n.target) for n in shared)
            weight_q, scale = ir.get_attr(gm, wq_node.target), ir.get_attr(gm, scale_node.target)
            wq_node.meta["val"], scale_node.meta["val"] = weight_q, scale
        with gm.graph.inserting_before(node):
            lookup = gm.graph.call_function(torch.ops.fxcompress.int8_embedding.default, (node.args[1], wq_node, scale_node, weight.dtype))
        lookup.meta.update(nn_module_stack=node.meta.get("nn_module_stack", {}), val=ir.fake_value(lookup.target, lookup.args))
        node.replace_all_uses_with(lookup)
        gm.graph.erase_node(node)
        result.rewritten.append(layer)
        result.details.append({
            "layer": layer, "mode": "weight_only", "op": "embedding", "weight_shape": tuple(weight.shape),
            "weight_rel_error": quantization_error(weight, weight_q, scale), "impl": "int8_embedding",
            "chosen_by": "embeddings=True (size: a lookup gathers rows, it is not faster)",
            **({"shared_with": ", ".join(ir.module_path(u) for u in shared[0].users)} if shared else {}),
        })


def _problem(gm: fx.GraphModule, node: fx.Node, table, skip, layer: str, head_tables: dict) -> str:
    if selectors.first_match(skip, layer):
        return "kept in float by skip="
    if not (isinstance(table, fx.Node) and table.op == "get_attr") or ir.get_attr(gm, table.target).dim() != 2:
        return "the embedding table is computed, not a 2-D parameter"
    if not ir.get_attr(gm, table.target).is_floating_point():
        return "the embedding table is not floating point"
    others = [user for user in table.users if user is not node and user.users]  # a rewritten linear is dead
    if others and table.target not in head_tables:
        return (f"the table is also read in float by {others[0].name} ({ir.module_path(others[0]) or 'the graph'}; "
                "a tied LM head kept float): an int8 copy would add bytes")
    return ""
