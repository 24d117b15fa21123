"""Fused per-token (per-row) absmax + symmetric int8 quantization.

For each row ``m`` of ``x``: ``s[m] = max(max_k |x[m, k]|, eps) / 127`` and
``q[m, k] = round(x[m, k] / s[m])`` (round half away from zero), so ``x ≈ s ⊙ q``.
With a static (calibrated, per-tensor) scale ``s`` is read instead of computed and ``q`` is
clamped to [-127, 127].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxcompress.triton_kernels import EPS
from fxcompress.triton_kernels._common import identity_launch, interpreting


@triton.jit
def _round_clamp_int8(y):
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    return tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, static_scale_ptr,
    K, stride_xm, stride_xk, stride_qm, stride_qk,
    eps, STATIC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offsets
            x = tl.load(x_row + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.abs(x))
        scale = tl.maximum(tl.max(absmax, axis=0), eps) / 127.0
        tl.store(scale_ptr + row, scale)
    inverse = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offsets
        x = tl.load(x_row + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_qm + k * stride_qk, _round_clamp_int8(x * inverse), mask=k < K)


def quantize_rows(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, launch=identity_launch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float tensor row-wise; returns ``(q int8 [M, K], scale fp32 [M, 1])``.

    With ``static_scale`` (a one-element fp32 tensor) every row uses it and it is returned expanded.
    """
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    block_k = 32 if interpreting() else min(triton.next_power_of_2(K), 4096)
    launch(_quantize_rows_kernel)[(M,)](
        x, q, scale, static_scale if static_scale is not None else scale,
        K, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        EPS, STATIC=static_scale is not None, BLOCK_K=block_k,
    )
    if static_scale is not None:
        scale = static_scale.reshape(1, 1).expand(M, 1)
    return q, scale
