"""``torch.compile(model, backend="fxcompress")``: our passes on every Dynamo subgraph, then Inductor.

Inference (grad disabled at compile time): the Dynamo graph's parameter and buffer inputs are frozen
into constants, the graph is re-captured at the ATen level with ``torch.export`` (the same IR
``fxcompress.optimize`` uses), the pass pipeline runs with full verification on the example inputs,
and the result goes to Inductor. Training (grad enabled): exactly Inductor, no passes — the lossless
passes fold parameters into new constants, which would cut them out of autograd.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._inductor.compile_fx import compile_fx

from . import ir
from .api import DEFAULT_PASSES
from .manager import PassManager
from .pass_base import Pass, PassContext
from .registry import make_pass

_STATE_SOURCES = ("._parameters[", "._buffers[")


def _is_module_state(node: fx.Node) -> bool:
    grapharg = node.meta.get("grapharg")
    return grapharg is not None and any(s in grapharg.source.name for s in _STATE_SOURCES)


def _symbol_location(value: torch.SymInt, tensors: list[tuple[fx.Node, torch.Tensor]]) -> tuple[fx.Node, int] | None:
    for node, fake in tensors:
        for dim, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and str(size) == str(value):
                return node, dim
    return None


def freeze_module_state(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int], dict]:
    """Turn parameter/buffer placeholders into constants and size placeholders into ``sym_size`` calls.

    Returns the frozen module (whose inputs are the remaining tensors), the indices of those
    inputs among Dynamo's, and ``dynamic_shapes`` for re-capturing it.
    """
    frozen = fx.GraphModule(torch.nn.Module(), gm.graph)  # shares nodes: copy the graph first
    frozen.graph = fx.Graph()
    env = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_inputs, kept = [], []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor) and not _is_module_state(node):
            env[node] = frozen.graph.placeholder(node.name)
            tensor_inputs.append((env[node], node.meta["example_value"]))
            kept.append(index)
    for node, value in zip(placeholders, example_inputs):
        if node in env:
            continue
        if isinstance(value, torch.Tensor):
            name = ir.unique_attr_name(frozen, node.name)
            frozen.register_buffer(name, value.detach())
            env[node] = frozen.graph.get_attr(name)
        else:
            location = _symbol_location(node.meta["example_value"], tensor_inputs)
            if location is None:
                raise NotImplementedError(f"graph input {node.name} ({type(value).__name__}) is not a tensor size")
            env[node] = frozen.graph.call_function(torch.ops.aten.sym_size.int, location)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = frozen.graph.node_copy(node, lambda n: env[n])
            env[node].meta = {}
    for name, module in gm.named_children():
        frozen.add_module(name, module)
    frozen.recompile()
    dynamic = {
        f"arg{i}": {d: torch.export.Dim.AUTO for d, s in enumerate(fake.shape) if isinstance(s, torch.SymInt)} or None
        for i, (_, fake) in enumerate(tensor_inputs)
    }
    return frozen, kept, dynamic


class _Positional(torch.nn.Module):
    """Gives the frozen graph a plain ``forward(arg0, arg1, ...)`` signature for ``torch.export``."""

    def __init__(self, inner: fx.GraphModule):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def _flat_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's pytree calling convention and input guards: flat tensors in, flat tuple out."""
    gm.graph._codegen = fx.graph.CodeGen()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    return fx.GraphModule(gm, gm.graph)  # a plain GraphModule, which Inductor's cache can pickle


def optimize_subgraph(gm: fx.GraphModule, example_inputs: Sequence[Any], passes: Sequence[Pass]) -> tuple[fx.GraphModule, list[int]]:
    frozen, kept, dynamic = freeze_module_state(gm, example_inputs)
    # fresh tensors: export marks dynamic dims on its inputs, Dynamo guards that its own are unmarked
    inputs = tuple(example_inputs[i].detach().clone() for i in kept)
    wrapper = _Positional(frozen)
    dynamic_shapes = {"args": tuple(dynamic[f"arg{i}"] for i in range(len(inputs)))}
    # outside Dynamo's tracing context, so export builds its own fake mode and shape environment
    with torch._guards.tracing(None), torch.no_grad():
        captured = _flat_graph(torch.export.export(wrapper, inputs, strict=False, dynamic_shapes=dynamic_shapes).module())
        PassManager(passes).run(captured, PassContext(inputs, {}))
    return captured, kept


def backend(passes: Sequence[str | Pass] | None = None, *, fallback: bool = True) -> Callable:
    """A configured backend: ``torch.compile(model, backend=fxcompress.backend(passes=["fold_bn", "int8"]))``.

    ``passes`` defaults to :data:`fxcompress.DEFAULT_PASSES` (lossless). With ``fallback`` a subgraph
    the passes cannot handle is compiled by plain Inductor with a warning naming the cause.
    """
    pipeline = [make_pass(p) for p in (DEFAULT_PASSES if passes is None else passes)]

    def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if torch.is_grad_enabled():
            return compile_fx(gm, example_inputs)
        try:
            optimized, kept = optimize_subgraph(gm, example_inputs, pipeline)
        except Exception as exc:
            if not fallback:
                raise
            warnings.warn(f"fxcompress backend: passes not applied to a subgraph, compiled by Inductor as is: {type(exc).__name__}: {exc}")
            return compile_fx(gm, example_inputs)
        compiled = compile_fx(optimized, [example_inputs[i] for i in kept])

        def run(*args):
            return compiled(*[args[i] for i in kept])

        run.fxcompress_graph = optimized
        return run

    compile_graph.passes = pipeline
    return compile_graph


def fxcompress_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The backend registered as ``"fxcompress"`` (entry point ``torch_dynamo_backends``): default passes."""
    return backend()(gm, example_inputs)
