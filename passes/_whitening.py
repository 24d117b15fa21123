"""Data-aware truncation for ``low_rank``: SVD of the weight times a square root of the input statistics.

With the calibration inputs as rows of ``X`` (tokens × K) and any ``S`` with ``S Sᵀ = XᵀX``, the
output error of a replacement ``Ŵ`` is ``‖(W − Ŵ) Xᵀ‖_F² = tr((W−Ŵ) XᵀX (W−Ŵ)ᵀ) = ‖(W − Ŵ) S‖_F²``.
So the best rank-r ``Ŵ`` on the data is the truncated SVD of ``W S = U Σ Vᵀ`` mapped back:
``Ŵ = U_r Σ_r V_rᵀ S⁻¹`` (SVD-LLM), and the output error is exactly ``Σ_{i>r} σ_i²``.

Because ``U_r Σ_r V_rᵀ = U_r U_rᵀ (W S)``, the same ``Ŵ`` is ``U_r (U_rᵀ W)``: the two factors are
``U_rᵀ W`` (r × K) and ``U_r`` (N × r), with no inverse of ``S`` — so a singular ``XᵀX`` (inputs in a
subspace) needs no damping. ``S`` comes from the eigendecomposition ``XᵀX = Q Λ Qᵀ``, ``S = Q Λ^½``.

* ``svd-llm``: ``S`` from the full Gram matrix (exact); when the layer only has diagonal statistics
  (too many input features) ``S = diag(‖x_j‖)``, exact only for uncorrelated input features.
* ``asvd``: ``S = diag(mean|x_j|^α)``, α = ½ (ASVD's activation-aware column scaling).
"""

from __future__ import annotations

import torch

from fxcompress.passes import _output_whitening, _refit
from fxcompress.statistics import LAYER_OPS, InputStatistics, calibration_batches, layer_statistics

METHODS = ("svd-llm", "asvd")
ASVD_ALPHA = 0.5


def input_root(stats: InputStatistics, method: str) -> tuple[torch.Tensor, str]:
    """``S`` (K×K, or a K-vector for a diagonal ``S``) and a description of the whitening used."""
    if method == "asvd":
        return (stats.channel_abs / max(stats.positions, 1)).pow(ASVD_ALPHA), "asvd"
    if stats.gram is None:
        return stats.channel_sq.sqrt(), f"diagonal ({stats.reason})"
    eigenvalues, eigenvectors = torch.linalg.eigh(stats.gram)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt(), "svd-llm"


def whitened_svd(weight: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, σ)`` of ``W S`` in float64; the rank-r replacement is ``U_r (U_rᵀ W)``."""
    w = weight.double()
    scaled = w * root.double() if root.dim() == 1 else w @ root.double()
    u, sigma, _ = torch.linalg.svd(scaled, full_matrices=False)
    return u, sigma


def basis_factors(weight: torch.Tensor, basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_rᵀ W, U_r)``: the first (r × K) and second (N × r) factor of ``Ŵ = U_r U_rᵀ W`` (or of a
    :class:`~fxcompress.passes._output_whitening.TwoSidedBasis`'s ``Ŵ = P⁻¹ U_r U_rᵀ P W``)."""
    if not isinstance(basis, torch.Tensor):
        return basis.factors(weight, rank)
    u_r = basis[:, :rank]
    return u_r.T @ weight.double(), u_r


def whiten_layers(gm, ctx, layers: list, method: str, centred: bool = False, output: bool = False) -> None:
    """Replace the spectra of ``low_rank``'s linear/pointwise layers by those of ``W·S``; note how each was treated.

    ``centred`` (``low_rank``'s refit): ``S`` from the centred Gram matrix, with the layer's
    :class:`~fxcompress.passes._refit.Fit` kept on ``layer.fit`` (full-Gram layers only).
    ``output`` (with ``centred``): two-sided, the output side weighted by the model-output Jacobian
    (:mod:`fxcompress.passes._output_whitening`), its root kept on ``layer.output_root``.
    """
    gemm_kinds = ("linear", "pointwise")
    measured = [layer for layer in layers if layer.kind in gemm_kinds and layer.node.target in LAYER_OPS]
    stats = layer_statistics(gm, ctx, [layer.node for layer in measured], gram=method == "svd-llm")
    if output:
        grams = _output_whitening.output_grams(gm, calibration_batches(ctx), [layer.node for layer in measured])
        for layer in measured:
            layer.output_root = _output_whitening.output_root(grams[layer.node.name]) if layer.node.name in grams else None
    for layer in layers:
        if layer.kind in gemm_kinds and layer not in measured:
            layer.whitening = f"none ({layer.node.target} form: input statistics cover linear/conv nodes only)"
        elif layer.kind not in gemm_kinds:
            layer.whitening = "none (k×k conv: factorized data-free)"
        elif layer.node.name not in stats:
            layer.whitening = "none (not executed on the calibration data)"
        elif centred and stats[layer.node.name].gram is not None:
            layer.fit = _refit.independent_fit(layer.weight, stats[layer.node.name], layer.output_root)
            layer.svds = [(layer.fit.basis, layer.fit.spectrum, None)]
            layer.whitening = "svd-llm, centred refit" + (", output-whitened" if layer.output_root is not None else "")
        else:
            root, layer.whitening = input_root(stats[layer.node.name], method)
            u, sigma = whitened_svd(layer.weight.reshape(layer.weight.shape[0], -1), root)
            layer.svds = [(u, sigma, None)]
