"""W8A8 GEMM: int8 × int8 → int32 accumulation with a fused dequantize + bias + activation epilogue.

``y[m, n] = act(acc[m, n] · s_x[m] · s_w[n] + b[n])`` with ``acc = A_q @ B_q^T`` exact in int32,
where ``A_q`` is [M, K] (activations, per-row or per-tensor scale ``s_x``) and ``B_q`` is [N, K]
(the ``nn.Linear`` weight layout, per-output-channel scale ``s_w``). Without scales the raw int32
accumulator is stored (a drop-in for ``torch._int_mm`` on shapes cuBLAS refuses: M ≤ 16, K or N
not a multiple of 8). All operands are addressed through their strides, so non-contiguous inputs
need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxcompress.triton_kernels._common import (
    activation_code, apply_activation, gemm_config, grouped_tile, identity_launch, pick_configs,
)


# H100: large tiles for compute-bound prefill; BLOCK_M = 16/32 tiles for decode-sized M.
_GPU_CONFIGS = [gemm_config(*tile) for tile in (  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
    (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4),
    (64, 64, 128, 5, 4), (32, 128, 128, 4, 4), (16, 128, 256, 3, 4), (16, 64, 256, 4, 4),
)]
_INTERPRETER_CONFIGS = [gemm_config(16, 32, 32, 1, 4, group_m=2)]


def _m_bucket(M: int) -> int:
    """Autotuning key for M: re-tune per power of two, not per distinct batch size."""
    return min(triton.next_power_of_2(max(M, 1)), 4096)


@triton.autotune(configs=pick_configs(_GPU_CONFIGS, _INTERPRETER_CONFIGS), key=["M_BUCKET", "N", "K", "DEQUANT"])
@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, row_scale_ptr, col_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_rs,
    DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
    b_tile = b_ptr + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_tile, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0)
        b = tl.load(b_tile, mask=(cols[None, :] < N) & (ks[:, None] < k_left), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_tile += BLOCK_K * stride_ak
        b_tile += BLOCK_K * stride_bk
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    c_tile = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    if DEQUANT:
        row_scale = tl.load(row_scale_ptr + rows * stride_rs, mask=rows < M, other=0.0)
        col_scale = tl.load(col_scale_ptr + cols, mask=cols < N, other=0.0)
        y = acc.to(tl.float32) * row_scale[:, None] * col_scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y = apply_activation(y, ACTIVATION)
        tl.store(c_tile, y.to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(c_tile, acc, mask=out_mask)


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def int8_mm(a: torch.Tensor, b: torch.Tensor, launch=identity_launch) -> torch.Tensor:
    """``a [M, K] int8 @ b[N, K]^T int8 -> int32 [M, N]``, exact."""
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=torch.int32, device=a.device)
    launch(_int8_gemm_kernel)[_grid(M, N)](
        a, b, c, c, c, c, M, N, K, _m_bucket(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), 0,
        DEQUANT=False, HAS_BIAS=False, ACTIVATION=0,
    )
    return c


def int8_gemm_dequant(
    a: torch.Tensor,
    b: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
    launch=identity_launch,
) -> torch.Tensor:
    """``act((a @ b^T) · row_scale · col_scale^T + bias)``; ``row_scale`` is [M] / [M, 1], or one element (per tensor)."""
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    per_tensor = row_scale.numel() == 1 and M != 1
    launch(_int8_gemm_kernel)[_grid(M, N)](
        a, b, c, row_scale, col_scale, bias if bias is not None else col_scale, M, N, K, _m_bucket(M),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), 0 if per_tensor else row_scale.stride(0),
        DEQUANT=True, HAS_BIAS=bias is not None, ACTIVATION=activation_code(activation),
    )
    return c
