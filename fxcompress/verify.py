"""Checks the pass manager runs after every pass: output structure, shapes, dtypes and values, and the
pre-pass snapshot that names the first diverging node."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from . import ir


@dataclass
class GraphSnapshot:
    """The graph before a pass, sharing the live tensors and submodules: O(nodes) to take, no weight is
    copied. Passes replace tensors rather than write them, so the snapshot stays the pre-pass model;
    a tensor written in place (its ``_version`` moved) is detected instead."""

    module: fx.GraphModule
    versions: list[tuple[torch.Tensor, int]]

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "GraphSnapshot":
        attrs = {n.target: ir.get_attr(gm, n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
        module = fx.GraphModule(attrs, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
        for key in ("_in_spec", "_out_spec"):
            if hasattr(gm, key):
                setattr(module, key, getattr(gm, key))
        tensors = [t for t in attrs.values() if isinstance(t, torch.Tensor)]
        tensors += [t for m in attrs.values() if isinstance(m, torch.nn.Module) for t in m.state_dict(keep_vars=True).values()]
        return cls(module, [(t, t._version) for t in tensors])

    def written_in_place(self) -> list[torch.Tensor]:
        return [t for t, version in self.versions if t._version != version]


def output_signature(outputs: Any) -> tuple:
    """Pytree structure plus (shape, dtype) of every tensor leaf: what a pass must not change."""
    leaves, spec = pytree.tree_flatten(outputs)
    return str(spec), [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in leaves]


@dataclass(frozen=True)
class Fidelity:
    max_abs_err: float
    max_rel_err: float
    cosine: float


def float_leaves(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def fidelity(reference: Any, candidate: Any) -> Fidelity:
    """Error of ``candidate`` against ``reference``; relative error is scaled by max|reference|.

    Non-float leaves (indices, masks) must match exactly, otherwise the error is infinite.
    """
    refs, cands = float_leaves(reference), float_leaves(candidate)
    if len(refs) != len(cands):
        return Fidelity(math.inf, math.inf, float("nan"))
    ref_parts, cand_parts = [], []
    for r, c in zip(refs, cands):
        if r.shape != c.shape:
            return Fidelity(math.inf, math.inf, float("nan"))
        if not r.is_floating_point():
            if not torch.equal(r, c.to(r.dtype)):
                return Fidelity(math.inf, math.inf, float("nan"))
            continue
        ref_parts.append(r.detach().double().flatten().cpu())
        cand_parts.append(c.detach().double().flatten().cpu())
    if not ref_parts:
        return Fidelity(0.0, 0.0, 1.0)
    ref, cand = torch.cat(ref_parts), torch.cat(cand_parts)
    max_abs = (ref - cand).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-12)
    cosine = torch.nn.functional.cosine_similarity(ref, cand, dim=0, eps=1e-12).item() if ref.numel() else 1.0
    if not math.isfinite(max_abs):
        return Fidelity(math.inf, math.inf, float("nan"))
    return Fidelity(max_abs, max_abs / scale, cosine)


def default_rtol(outputs: Any) -> float:
    """Lossless tolerance by the least precise float output dtype."""
    dtypes = {t.dtype for t in float_leaves(outputs) if t.is_floating_point()}
    if torch.bfloat16 in dtypes:
        return 2e-2
    if torch.float16 in dtypes:
        return 2e-3
    return 1e-5


class _RecordingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str] | None):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and (self.names is None or n.name in self.names):
            self.values[n.name] = result.detach()
        return result


def node_values(gm: fx.GraphModule, args: tuple, kwargs: dict, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor an fx node of ``gm`` (or only those in ``names``) produces on the given inputs."""
    flat = tree_flatten_spec((args, kwargs), gm._in_spec) if getattr(gm, "_in_spec", None) else list(args)
    interpreter = _RecordingInterpreter(gm, names)
    with torch.no_grad():
        interpreter.run(*flat)
    return interpreter.values


def first_diverging_node(before: fx.GraphModule, after: fx.GraphModule, args: tuple, kwargs: dict, rtol: float) -> str:
    """Name of the first node (in ``after``'s order) whose value differs from the same-named node in ``before``."""
    old, new = node_values(before, args, kwargs), node_values(after, args, kwargs)
    for node in after.graph.nodes:
        if node.op in ("placeholder", "get_attr") or node.name not in old or node.name not in new:
            continue
        a, b = old[node.name], new[node.name]
        if a.shape != b.shape or a.dtype != b.dtype:
            return node.name
        if fidelity(a, b).max_rel_err > rtol:
            return node.name
    return "output"
