"""Helpers over the canonical IR: an ATen-level ``torch.fx.GraphModule`` from ``torch.export``.

Parameters and buffers are ``get_attr`` nodes whose target is a dotted attribute path;
every ``call_function`` node carries ``meta["val"]`` (a fake tensor with the traced shape)
and ``meta["nn_module_stack"]`` (which module of the user's model it came from).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.operator_schemas import normalize_function


def get_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Store ``value`` at ``target``, as an ``nn.Parameter`` if the old value was one (or if new)."""
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    old = getattr(owner, leaf, None)
    if isinstance(old, torch.Tensor) and not isinstance(old, torch.nn.Parameter) and leaf in owner._buffers:
        owner._buffers[leaf] = value.detach()
    else:
        # new float parameters are trainable, so distillation can recover what a lossy pass cost
        requires_grad = old.requires_grad if isinstance(old, torch.nn.Parameter) else value.is_floating_point()
        if hasattr(owner, leaf) and leaf not in owner._parameters:
            delattr(owner, leaf)
        owner.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=requires_grad))


def unique_attr_name(gm: torch.nn.Module, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_constant(gm: fx.GraphModule, base: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``value`` as a new top-level parameter of ``gm`` and return a get_attr node for it."""
    name = unique_attr_name(gm, base)
    set_attr(gm, name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def attr_use_count(gm: fx.GraphModule, target: str) -> int:
    """How many times the tensor at ``target`` is consumed anywhere in the graph."""
    return sum(len(n.users) for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)


def delete_unused_attrs(gm: fx.GraphModule) -> None:
    """Drop parameters/buffers no get_attr node refers to any more, then empty submodules."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used_prefixes = {t.rsplit(".", 1)[0] for t in used if "." in t}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used:
            continue
        *path, leaf = name.split(".")
        owner = gm
        for part in path:
            owner = getattr(owner, part)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
    for name, mod in sorted(gm.named_modules(), key=lambda kv: -kv[0].count(".")):
        if name and name not in used_prefixes and type(mod) is torch.nn.Module:
            if not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers()):
                *path, leaf = name.split(".")
                owner = gm
                for part in path:
                    owner = getattr(owner, part)
                delattr(owner, leaf)


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost user module that produced ``node`` ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_module_path(path)


def _clean_module_path(path: str) -> str:
    # export writes e.g. "L['self'].layer1[0].conv" or "layer1.0.conv" depending on version
    path = path.replace("L['self']", "").replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return path.strip(".")


def fake_shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def finalize(gm: fx.GraphModule) -> None:
    """Dead-code elimination, attribute clean-up, lint and recompile after a rewrite."""
    gm.graph.eliminate_dead_code()
    delete_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()


def _schema_arguments(node: fx.Node) -> list:
    return list(node.target._schema.arguments)


def call_arguments(node: fx.Node) -> dict:
    """All arguments of an ATen call node by schema name, with schema defaults filled in.

    ``torch.fx.operator_schemas.normalize_function`` binds them; it calls a schema's ``self``
    ``input`` (a Python signature cannot have ``self``), which is named back here.
    """
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        raise ValueError(f"cannot bind the arguments of {node.target} to its schema: args={node.args}, kwargs={node.kwargs}")
    names = [a.name for a in _schema_arguments(node)]
    python_name = {name: "input" if name == "self" and "input" not in names else name for name in names}
    return {name: normalized.kwargs.get(python_name[name]) for name in names}


def set_call_argument(node: fx.Node, name: str, value) -> None:
    """Set one schema argument of an ATen call node, materialising defaulted positional args before it."""
    schema = _schema_arguments(node)
    names = [a.name for a in schema]
    index = names.index(name)
    if name in node.kwargs or schema[index].kwarg_only:
        node.update_kwarg(name, value)
        return
    args = list(node.args)
    for i in range(len(args), index + 1):
        args.append(schema[i].default_value if schema[i].has_default_value() else None)
    args[index] = value
    node.args = tuple(args)


def fake_value(target, args: tuple):
    """The fake tensor ``target(*args)`` yields in the graph's fake mode (symbolic sizes kept).

    ``args`` may hold fx nodes; a node without a fake value (a new constant) is faked from its
    real tensor. ``None`` when no input carries a fake value.
    """
    inputs: list[fx.Node] = []
    fx.node.map_arg(args, inputs.append)
    mode = detect_fake_mode([n.meta.get("val") for n in inputs])
    if mode is None:
        return None

    def fake(node: fx.Node):
        value = node.meta.get("val")
        if value is None and node.op == "get_attr":
            value = get_attr(node.graph.owning_module, node.target)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return mode.from_tensor(value, static_shapes=True)
        return value

    with mode, enable_python_dispatcher():  # symbolic shapes need the Python meta kernels
        return target(*fx.node.map_arg(args, fake))
