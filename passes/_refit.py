"""Closed-form refit of ``low_rank``'s whitened factors to the original layer outputs, optionally sequential.

A layer ``y = W x + b`` is replaced by a rank-r map ``ŷ = Ŵ x' + b̂``. ``x`` are its calibration inputs
in the original model; ``x'`` those it receives once the layers before it are factorized
(``sequential=True``; otherwise ``x' = x``). The target is always the *original* output ``W x + b``.
With centred statistics over the n calibration rows (``m``, ``m'`` the means of ``x``, ``x'``)

    G' = Σ (x' − m')(x' − m')ᵀ,   C = Σ (x − m)(x' − m')ᵀ,   λ = ridge · mean(diag G'),

the objective ``Σ ‖W x + b − Ŵ x' − b̂‖² + λ ‖Ŵ − W‖²`` equals ``‖(Ŵ − W*) R‖²_F`` plus a constant, with

    W* = W (C + λI)(G' + λI)⁻¹     (the full-rank fit; W* = W exactly when x' = x),
    R Rᵀ = G' + λI,                 b̂ = b + W m − Ŵ m'.

So the best rank-r ``Ŵ`` is the truncated SVD of ``W* R`` mapped back: ``W* R = U Σ Vᵀ``,
``Ŵ = U_r (U_rᵀ W*)`` — factors ``U_rᵀ W*`` (r × K) and ``U_r`` (N × r) — and the discarded ``σ²ᵢ`` are
exactly the output error it adds on the calibration data (the ridge toward ``W`` keeps the fit from
chasing directions the calibration data barely excites). Centring lets the bias absorb the inputs'
mean, which the uncentred whitening would spend rank on.

``sequential`` re-measures each group of layers sharing an input on the partly factorized graph,
in graph order, streaming the calibration data through the original and the current graph side by
side (each stopped after the group's inputs): cross statistics only, no activations kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.ir import add_constant, get_attr
from fxcompress.passes._output_whitening import TwoSidedBasis
from fxcompress.passes._factorizations import Stage, factorize, format_ranks, reconstruct
from fxcompress.passes._projections import gemm_arguments
from fxcompress.statistics import InputStatistics, calibration_batches, flat_inputs, input_recorder, layer_features

RIDGE = 1e-3
"""λ as a fraction of the mean input variance (diag G'): the pull of the refit toward the original W."""


@dataclass
class Fit:
    """A layer's refit target ``W*`` (N × K, float64), its whitened output basis and spectrum, and the bias it implies."""

    target: torch.Tensor
    basis: torch.Tensor | TwoSidedBasis
    spectrum: torch.Tensor
    mean_in: torch.Tensor  # m: original inputs
    mean_in_compressed: torch.Tensor  # m': inputs in the factorized model

    def bias(self, weight: torch.Tensor, bias: torch.Tensor | None, reconstructed: torch.Tensor) -> torch.Tensor:
        """``b̂ = b + W m − Ŵ m'`` for the rank-r ``Ŵ`` (``reconstructed``)."""
        shift = weight.double() @ self.mean_in - reconstructed.double() @ self.mean_in_compressed
        return shift if bias is None else bias.double() + shift


def fit(weight: torch.Tensor, mean_in: torch.Tensor, mean_in_compressed: torch.Tensor,
        gram_compressed: torch.Tensor, cross: torch.Tensor | None = None, ridge: float = RIDGE,
        output: tuple[torch.Tensor, torch.Tensor] | None = None) -> Fit:
    """:class:`Fit` from centred statistics ``G'`` (``gram_compressed``) and ``C`` (``cross``; ``None``: x' = x);
    ``output``: ``(P, P⁻¹)`` of :func:`~fxcompress.passes._output_whitening.output_root` (two-sided whitening)."""
    w = weight.double().reshape(weight.shape[0], -1)
    damp = ridge * float(gram_compressed.diagonal().mean().clamp(min=1e-30))
    damped = gram_compressed + damp * torch.eye(len(gram_compressed), dtype=torch.float64, device=w.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    target = w
    if cross is not None:  # W* = W + W (C − G') (G' + λI)⁻¹, through the eigendecomposition of G' + λI
        inverse = (eigenvectors / eigenvalues.clamp(min=1e-300)) @ eigenvectors.T
        target = w + w @ (cross - gram_compressed) @ inverse
    scaled = target @ (eigenvectors * eigenvalues.clamp(min=0).sqrt())
    if output is None:
        u, sigma, _ = torch.linalg.svd(scaled, full_matrices=False)
        return Fit(target, u, sigma, mean_in, mean_in_compressed)
    root, inverse_root = output
    u, sigma, _ = torch.linalg.svd(root @ scaled, full_matrices=False)
    return Fit(target, TwoSidedBasis(inverse_root @ u, u.T @ root), sigma, mean_in, mean_in_compressed)


def independent_fit(weight: torch.Tensor, stats: InputStatistics, output: tuple | None = None) -> Fit:
    """The fit on the original model's inputs alone (x' = x): centred whitening, ``W* = W``."""
    mean = stats.feature_sum / stats.rows
    centred = stats.gram - stats.rows * torch.outer(mean, mean)
    return fit(weight, mean, mean, centred, output=output)


def cross_statistics(original: fx.GraphModule, current: fx.GraphModule, nodes: list[fx.Node], batches: Iterable,
                     in_spec: Any) -> dict[str, tuple]:
    """Per node name: ``(m, m', G', C)`` (centred) of its inputs in ``original`` (x) and ``current`` (x')."""
    names = {node.name for node in nodes}
    capture_original, capture_current = input_recorder(original, names), input_recorder(current, names)
    sums: dict[str, list] = {}
    with torch.no_grad():
        for batch in batches:
            flat = flat_inputs(batch, in_spec)
            xs, xs_current = capture_original.record(*flat), capture_current.record(*flat)
            for node in nodes:  # per-batch products in fp32, accumulated in fp64 (as the statistics collector)
                x = layer_features(node, xs[node.name].float())
                x_current = layer_features(node, xs_current[node.name].float())
                add = [x.shape[0], x.sum(0).double(), x_current.sum(0).double(),
                       (x_current.T @ x_current).double(), (x.T @ x_current).double()]
                sums[node.name] = add if node.name not in sums else [a + b for a, b in zip(sums[node.name], add)]
    result = {}
    for name, (rows, sum_x, sum_current, gram, cross) in sums.items():
        m, m_current = sum_x / rows, sum_current / rows
        result[name] = (m, m_current, gram - rows * torch.outer(m_current, m_current),
                        cross - rows * torch.outer(m, m_current))
    return result


def sequential_refit(gm: fx.GraphModule, ctx: Any, layers: list, rewrite: Callable[[Any], None]) -> None:
    """Refit and rewrite ``layers`` (``low_rank`` layers with a chosen rank) in graph order, each group
    of layers that read one input measured on the graph with every earlier group already rewritten."""
    if not layers:
        return
    original = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # shares gm's tensors; the rewrite only adds new ones
    in_spec = getattr(gm, "_in_spec", None)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    groups: dict[fx.Node, list] = {}
    for layer in sorted(layers, key=lambda item: order[item.node]):
        groups.setdefault(ir.call_arguments(layer.node)["input"], []).append(layer)
    for group in groups.values():
        stats = cross_statistics(original, gm, [layer.node for layer in group], calibration_batches(ctx), in_spec)
        for layer in group:
            if layer.node.name in stats:
                layer.fit = fit(layer.weight, *stats[layer.node.name], output=layer.output_root)
                layer.svds = [(layer.fit.basis, layer.fit.spectrum, None)]
                layer.whitening = "svd-llm, sequential refit" + (", output-whitened" if layer.output_root is not None else "")
            rewrite(layer)


def factorized(layer, ranks: tuple[int, ...]) -> list[Stage]:
    """The layer's chain at ``ranks``: of its weight, or of the refit's least-squares target."""
    target = layer.weight if layer.fit is None else layer.fit.target.reshape(layer.weight.shape).to(layer.weight.dtype)
    return factorize(target, layer.kind, ranks, layer.geometry, layer.svds)


def approximation(gm: fx.GraphModule, layer, ranks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The single weight and the bias the factorized chain at ``ranks`` amounts to."""
    stages = factorized(layer, ranks)
    bias = refit_bias(gm, layer, stages)
    if bias is None:
        old = gemm_arguments(layer.node)["bias"]
        bias = get_attr(gm, old.target) if isinstance(old, fx.Node) else None
    return reconstruct(layer.kind, stages).to(layer.weight.dtype), bias


def refit_whole(gm: fx.GraphModule, layer, result) -> None:
    """A layer the budget keeps whole, refit at full rank to the original outputs on its (changed) inputs: same MACs."""
    node, args = layer.node, gemm_arguments(layer.node)
    weight = layer.fit.target.reshape(layer.weight.shape).to(layer.weight.dtype)
    old = get_attr(gm, args["bias"].target).detach() if isinstance(args["bias"], fx.Node) else None
    bias = layer.fit.bias(layer.weight.reshape(len(weight), -1), old, layer.fit.target).to(weight.dtype)
    prefix = layer.name or node.name
    node.args = (node.args[0], add_constant(gm, f"{prefix}_refit", weight, before=node),
                 add_constant(gm, f"{prefix}_refit_bias", bias, before=node), *node.args[3:])
    result.rewritten.append(layer.name)
    result.details.append({"layer": layer.name, "kind": "refit (kept whole)", "full_rank": format_ranks(layer.full_ranks),
                           "rank": format_ranks(layer.full_ranks), "macs_before": layer.macs(), "macs_after": layer.macs(),
                           "rel_error": float(torch.linalg.vector_norm(weight - layer.weight) / torch.linalg.vector_norm(layer.weight)),
                           "whitening": layer.whitening})


def refit_bias(gm: fx.GraphModule, layer, stages: list[Stage]) -> torch.Tensor | None:
    """The refit's bias ``b + W m − Ŵ m'`` (None without a refit: the layer's bias is kept)."""
    if layer.fit is None:
        return None
    bias = gemm_arguments(layer.node)["bias"]
    old = get_attr(gm, bias.target).detach() if isinstance(bias, fx.Node) else None
    weight, reconstructed = (w.reshape(w.shape[0], -1) for w in (layer.weight, reconstruct(layer.kind, stages)))
    return layer.fit.bias(weight, old, reconstructed).to(layer.weight.dtype)
