"""Mixture-of-experts experts modules with int8 expert weights: what :func:`fxcompress.apply_to_model` makes of an
experts module (transformers' ``MixtralExperts``, ``Qwen2MoeExperts``, ...) whose grouped GEMMs the ``int8`` pass
rewrote into ``fxcompress::int8_grouped_linear``.

The module keeps its own class and attributes (``act_fn``, ``_apply_gate``, biases, ``num_experts``): its class
becomes a subclass of it with :class:`Int8ExpertsMixin` first, whose ``forward`` is transformers'
``grouped_mm_experts_forward`` (sort the routed rows by expert, one grouped GEMM per projection, weighted sum
over the top-k) with the int8 op in place of each rewritten projection. Each rewritten 3-D parameter ``name``
is replaced by the buffers ``name_int8 [E, N, K]`` and ``name_scale [E, N]`` and its engines
``(small, large, max_small_rows)``, the very ones the graph's measured lowering chose; a projection the pass
kept float keeps its parameter.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from . import ir, ops  # noqa: F401  (ops registers torch.ops.fxcompress.*)

GROUPED_OP = torch.ops.fxcompress.int8_grouped_linear.default
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


class Int8ExpertsMixin:
    """``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` over int8 experts."""

    int8_projections: dict[str, tuple[str, str, int]]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_is_expert_parallel", False):
            raise RuntimeError("fxcompress int8 experts run on one device: expert parallelism is not supported")
        num_top_k, tokens = top_k_index.size(-1), hidden_states.size(0)
        expert_ids, perm = torch.sort(top_k_index.reshape(-1))
        rows = hidden_states[perm // num_top_k]
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        first = "gate_up_proj" if self.has_gate else "up_proj"
        out = self._grouped(first, rows, offsets, expert_ids)
        out = self._apply_gate(out) if self.has_gate else self.act_fn(out)
        out = self._grouped("down_proj", out, offsets, expert_ids)
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        restored = torch.empty_like(out)
        restored[perm] = out
        return restored.view(tokens, num_top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _grouped(self, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        engines = self.int8_projections.get(name)
        if engines is not None:
            y = torch.ops.fxcompress.int8_grouped_linear(x, getattr(self, f"{name}_int8"), getattr(self, f"{name}_scale"),
                                                         offsets, *engines)
        else:  # kept float by the pass: its own parameter, expert by expert
            weight = getattr(self, name)
            weight = weight.transpose(-2, -1) if self.is_transposed else weight
            y = x.new_zeros((x.shape[0], weight.shape[1]))
            start = 0
            for expert, end in enumerate(offsets.tolist()):
                if end > start:
                    y[start:end] = torch.nn.functional.linear(x[start:end].to(weight.dtype), weight[expert])
                start = max(start, end)
        if self.has_bias:
            y = y + getattr(self, f"{name}_bias")[expert_ids]
        return y

    def spec(self) -> dict:
        return {"kind": "int8_experts",
                "projections": {name: {"shape": list(getattr(self, f"{name}_int8").shape), "engines": list(engines)}
                                for name, engines in self.int8_projections.items()}}


@functools.cache
def _int8_class(cls: type) -> type:
    return type(f"Int8{cls.__name__}", (Int8ExpertsMixin, cls), {"__module__": __name__})


def to_int8_experts(module: torch.nn.Module, projections: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[str, str, int]]]) -> torch.nn.Module:
    """Turn ``module`` (an experts module, mutated: pass a copy) into its int8 subclass: each ``name`` in
    ``projections`` -> (``W_q [E, N, K]``, ``s_w [E, N]``, engines) replaces the float parameter ``name``."""
    if not all(hasattr(module, a) for a in ("num_experts", "has_gate", "has_bias", "is_transposed")):
        raise ValueError(f"{type(module).__name__} is not a transformers experts module (use_experts_implementation)")
    previous = getattr(module, "int8_projections", {})
    for name, (weight_q, weight_scale, engines) in projections.items():
        module._parameters.pop(name, None)
        module.register_buffer(f"{name}_int8", weight_q)
        module.register_buffer(f"{name}_scale", weight_scale)
    module.__class__ = _int8_class(type(module)) if not isinstance(module, Int8ExpertsMixin) else type(module)
    module.int8_projections = {**previous, **{name: tuple(engines) for name, (_, _, engines) in projections.items()}}
    return module


def empty_int8_experts(module: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """``module`` with empty int8 buffers of ``spec``'s shapes (filled by the state dict that follows)."""
    return to_int8_experts(module, {
        name: (torch.zeros(entry["shape"], dtype=torch.int8), torch.ones(entry["shape"][:2]), tuple(entry["engines"]))
        for name, entry in spec["projections"].items()})


def expert_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Experts module path -> its ``int8_grouped_linear`` nodes."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is GROUPED_OP:
            found.setdefault(ir.module_path(node), []).append(node)
    return found


def experts_from_nodes(gm: fx.GraphModule, module: torch.nn.Module, path: str, nodes: list[fx.Node]) -> tuple[torch.nn.Module, set[str]]:
    """``module`` (a copy) as int8 experts computing ``nodes``; also the graph tensors it took."""
    projections, taken = {}, set()
    for node in nodes:
        _, weight_q, weight_scale, _, small, large, rows = node.args
        name = next((p for p in PROJECTIONS if weight_q.target.startswith(f"{path}.{p}_int8".replace(".", "_"))), None)
        if name is None:
            raise ValueError(f"{weight_q.target} is not one of {path}'s expert weights {PROJECTIONS}")
        projections[name] = (ir.get_attr(gm, weight_q.target).detach().clone(), ir.get_attr(gm, weight_scale.target).detach().clone(),
                             (small, large, rows))
        taken.update((weight_q.target, weight_scale.target))
    return to_int8_experts(module, projections), taken
