"""GPTQ weight rounding for the ``int8`` pass (Frantar et al., 2022; the reference implementation's algorithm).

The layer-output error of a rounded weight ``Q`` on inputs ``X`` is ``‖(W − Q) Xᵀ‖² = tr(ΔW H ΔWᵀ)``
with ``H = XᵀX``. GPTQ rounds the columns of ``W`` one after another and, after rounding column ``j``,
moves its error onto the columns not yet rounded along the inverse-Hessian row, the optimal update
for ``H``:

    e = (w_j − q_j) / [H⁻¹]_jj,     W[:, j+1:] −= e · [H⁻¹]_{j, j+1:}

with ``[H⁻¹]`` taken from the upper Cholesky factor of ``H⁻¹`` (the reference's numerically stable
form of the successive eliminations), ``H`` dampened by ``damp · mean(diag H)``, and the updates
applied lazily in blocks of ``block`` columns. Scales are symmetric per output channel from the
original weights, ``s[n] = max_k |W[n, k]| / 127``, so ``W_q = round(Q / s)`` stays in ``[−127, 127]``.
Columns whose input is always zero (``H_jj = 0``) are set to zero.
"""

from __future__ import annotations

import torch

from fxcompress.statistics import layer_statistics

DAMP = 0.01
BLOCK = 128


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, damp: float = DAMP, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K]``, ``H [K, K]`` → ``(W_q int8 [N, K], s_w fp32 [N])`` with ``W ≈ s_w[:, None] · W_q``."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # rows of the transposed weight are the columns GPTQ walks: contiguous updates
    columns_t, codes = w.T.contiguous(), torch.zeros(w.shape[1], w.shape[0], dtype=w.dtype)
    for start in range(0, columns_t.shape[0], block):
        end = min(start + block, columns_t.shape[0])
        block_t, h_block = columns_t[start:end].clone(), inverse[start:end, start:end]
        errors = torch.zeros_like(block_t)
        for i in range(end - start):
            code = torch.round(block_t[i] / scale).clamp_(-127, 127)
            codes[start + i] = code
            errors[i] = (block_t[i] - code * scale) / h_block[i, i]
            block_t[i:].addr_(h_block[i, i:], errors[i], alpha=-1)
        columns_t[end:] -= inverse[start:end, end:].T @ errors
    codes = codes.T
    return codes.to(torch.int8), scale.float()


def smoothed_hessian(hessian: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """The Hessian of ``x / σ`` (SmoothQuant divides the input, multiplies the weight by ``σ``)."""
    if sigma is None:
        return hessian
    inverse = sigma.double().reciprocal()
    return hessian * inverse[:, None] * inverse[None, :]


def layer_hessians(gm, ctx, nodes: list) -> dict[str, torch.Tensor]:
    """``H = XᵀX`` of each node's input on the calibration data (absent where only diagonal statistics exist)."""
    return {name: s.gram for name, s in layer_statistics(gm, ctx, nodes, gram=True).items() if s.gram is not None}
