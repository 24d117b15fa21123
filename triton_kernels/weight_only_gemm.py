"""Weight-only int8 GEMM/GEMV (W8A16): activations stay float, weights are dequantized in registers.

``y[m, n] = s_w[n] · Σ_k x[m, k] · float(W_q[n, k]) + b[n]``: each int8 weight tile is converted to
the activation dtype after the load, so only one byte per weight crosses memory (the decode case is
bound by that traffic). The per-channel scale factors out of the sum and is applied once in the
epilogue. Small-M configs split K over programs that ``atomic_add`` their fp32 partial sums, so a
GEMV at M = 1 still fills the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxcompress.triton_kernels._common import grouped_tile, identity_launch, interpreting, pick_configs


def _config(bm, bn, bk, split_k, stages, warps, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": group_m},
        num_stages=stages, num_warps=warps,
    )


# H100: decode (M ≤ 16) wants many programs streaming the weight -> narrow N tiles and split-K;
# prefill wants the usual large tiles.
_GPU_CONFIGS = [
    _config(16, 64, 128, 4, 4, 4),
    _config(16, 64, 256, 8, 3, 4),
    _config(16, 128, 128, 2, 4, 4),
    _config(16, 32, 256, 16, 3, 4),
    _config(32, 64, 128, 4, 4, 4),
    _config(64, 128, 64, 1, 4, 4),
    _config(128, 128, 64, 1, 4, 8),
    _config(128, 256, 64, 1, 3, 8),
]
_INTERPRETER_CONFIGS = [_config(16, 32, 32, 2, 1, 4, group_m=2)]


@triton.autotune(
    configs=pick_configs(_GPU_CONFIGS, _INTERPRETER_CONFIGS),
    key=["M_BUCKET", "N", "K", "DOT_IN_FP32"],
    reset_to_zero=["c_ptr"],
)
@triton.jit
def _weight_only_gemm_kernel(
    x_ptr, w_ptr, c_ptr, scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    x_tile = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    w_tile = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k_left = K - k0 + pid_k * BLOCK_K
        x = tl.load(x_tile, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)
        w = tl.load(w_tile, mask=(cols[None, :] < N) & (ks[:, None] < k_left), other=0)
        if DOT_IN_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_tile += BLOCK_K * SPLIT_K * stride_xk
        w_tile += BLOCK_K * SPLIT_K * stride_wk
    y = acc * tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & (cols[None, :] < N)
    c_tile = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    if SPLIT_K == 1:
        tl.store(c_tile, y, mask=out_mask)
    else:
        tl.atomic_add(c_tile, y, mask=out_mask)


def weight_only_gemm(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, launch=identity_launch
) -> torch.Tensor:
    """``(x @ float(w)^T) · scale + bias`` for float ``x [M, K]``, int8 ``w [N, K]``; result in ``x.dtype``."""
    M, K = x.shape
    N = w.shape[0]
    c = torch.zeros((M, N), dtype=torch.float32, device=x.device)  # split-K programs accumulate into it

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    launch(_weight_only_gemm_kernel)[grid](
        x, w, c, scale, bias if bias is not None else scale, M, N, K, min(triton.next_power_of_2(max(M, 1)), 4096),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None,
        # fp32 activations keep full precision (no TF32); the interpreter's bf16 dot is wrong, so upcast there
        DOT_IN_FP32=x.dtype == torch.float32 or interpreting(),
    )
    return c.to(x.dtype)
