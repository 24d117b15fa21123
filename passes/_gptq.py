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
    codes = torch.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w_block, errors = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=w.dtype)
        h_block = inverse[start:end, start:end]
        for i in range(end - start):
            column = w_block[:, i]
            code = torch.round(column / scale).clamp(-127, 127)
            codes[:, start + i] = code
            error = (column - code * scale) / h_block[i, i]
            w_block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes.to(torch.int8), scale.float()


def smoothed_hessian(hessian: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """The Hessian of ``x / σ`` (SmoothQuant divides the input, multiplies the weight by ``σ``)."""
    if sigma is None:
        return hessian
    inverse = sigma.double().reciprocal()
    return hessian * inverse[:, None] * inverse[None, :]


def layer_hessians(gm, ctx, nodes: list) -> dict[str, torch.Tensor]:
    """``H = XᵀX`` of each node's input on the calibration data (absent where only diagonal statistics exist)."""
    from fxcompress.statistics import layer_statistics

    return {name: s.gram for name, s in layer_statistics(gm, ctx, nodes, gram=True).items() if s.gram is not None}
