"""Output-side whitening for ``low_rank``'s refit: how much each output direction of a layer moves the model.

A layer's own output error ``E = (Ŵ − W) X`` does not reach the model's outputs unchanged: a query
projection's error goes through a softmax against the keys, a value projection's through the output
projection. To first order the model's outputs move by ``Σ_t J_t e_t`` (``J_t`` the Jacobian of all
graph outputs with respect to the layer's output at row ``t``), and with the rows' errors treated as
independent (K-FAC) the model-output error is

    Σ_t ‖J_t e_t‖² = tr((Ŵ − W) G_in (Ŵ − W)ᵀ G_out),   G_out = Σ_t J_tᵀ J_t.

``G_out`` is estimated without forming a Jacobian: for a random ``z ~ N(0, I)`` over the outputs,
``g_t = J_tᵀ z`` (one backward pass) has ``E[g_t g_tᵀ] = J_tᵀ J_t``. With ``P`` a symmetric root of
``G_out + δ I`` (δ a fraction of its mean diagonal, so directions the data never excites keep a small
weight) and ``R`` that of the input side, the best rank-r ``Ŵ`` is the truncated SVD of ``P W R = U Σ Vᵀ``
mapped back: ``Ŵ = P⁻¹ U_r U_rᵀ P W`` — factors ``U_rᵀ P W`` (r × K) and ``P⁻¹ U_r`` (N × r), and the
discarded ``σ²`` are the first-order model-output error. ``P = I`` is the input-only whitening.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fxcompress.statistics import ValueRecorder, flat_inputs

DAMPING = 0.1
"""δ as a fraction of the mean diagonal of ``G_out``: the floor on an output direction's weight."""
PROJECTIONS = 2
"""Random output directions ``z`` (backward passes) per calibration batch."""


@dataclass(frozen=True)
class TwoSidedBasis:
    """The rank-r ``Ŵ = left[:, :r] @ (right[:r] @ W)``, with ``left = P⁻¹U`` and ``right = UᵀP``."""

    left: torch.Tensor
    right: torch.Tensor

    def factors(self, weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_rᵀ P W, P⁻¹ U_r)``: the first (r × K) and second (N × r) factor."""
        return self.right[:rank] @ weight.double(), self.left[:, :rank]


class _GradientCapture(ValueRecorder):
    """Runs the whole graph with gradients on the (floating-point) outputs of ``names``, which are kept."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm, names, stop=False)

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.op == "get_attr" and isinstance(value, torch.Tensor):
            return value.detach()  # gradients reach the kept outputs only, never the parameters
        return value

    def keep(self, keys: list[str], value: Any) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if value.requires_grad:
                value.retain_grad()
            else:
                value.requires_grad_(True)
            super().keep(keys, value)


def output_grams(gm: fx.GraphModule, batches: Iterable, nodes: list[fx.Node], projections: int = PROJECTIONS,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Per node name: ``G_out = Σ_t g_t g_tᵀ`` (float64, N × N) over the calibration rows, averaged over
    ``projections`` random output directions per batch."""
    capture = _GradientCapture(gm, {node.name for node in nodes})
    node_is_linear = {node.name: node.target is torch.ops.aten.linear.default for node in nodes}
    generator = torch.Generator().manual_seed(seed)
    in_spec = getattr(gm, "_in_spec", None)
    grams: dict[str, torch.Tensor] = {}
    for batch in batches:
        flat = flat_inputs(batch, in_spec)
        for _ in range(projections):
            with torch.enable_grad():
                outputs = [t for t in tree_leaves(capture.run(*flat)) if isinstance(t, torch.Tensor) and t.requires_grad]
                if not outputs:
                    return {}
                directions = [torch.randn(t.shape, generator=generator).to(t) for t in outputs]
                torch.autograd.backward(outputs, directions)
            for name, value in capture.recorded.items():
                if value.grad is not None:
                    channels_last = value.grad.detach() if value.dim() < 3 or node_is_linear[name] else value.grad.movedim(1, -1)
                    rows = channels_last.reshape(-1, channels_last.shape[-1]).float()
                    gram = (rows.T @ rows).double() / projections
                    grams[name] = gram if name not in grams else grams[name] + gram
    return grams


def output_root(gram: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, P⁻¹)``: the symmetric root of ``G_out + δ I`` and its inverse."""
    damp = damping * float(gram.diagonal().mean().clamp(min=1e-30))
    eigenvalues, eigenvectors = torch.linalg.eigh(gram + damp * torch.eye(len(gram), dtype=gram.dtype))
    root = eigenvalues.clamp(min=damp).sqrt()
    return (eigenvectors * root) @ eigenvectors.T, (eigenvectors / root) @ eigenvectors.T
