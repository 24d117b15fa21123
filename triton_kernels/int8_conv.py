"""Static int8 convolution (CUDA): implicit GEMM on NHWC ``uint8`` activations, int32 accumulation.

The operands are those of ``fxcompress::int8_conv``: activations ``x ≈ s_x · (q_x − z_x)`` (``uint8``,
one ``(s, z)`` per tensor), weights ``W ≈ s_w[n] · W_q[n]`` (``int8``, symmetric per output channel).
Per output pixel ``m`` and channel ``n``::

    acc[m, n] = Σ_k (q_x[m, k] − z_x) · W_q[n, k]                               (int32, exact)
    y[m, n]   = act(s_x · s_w[n] · acc[m, n] + b[n] [+ s_r · (q_r[m, n] − z_r)])
    out       = clamp(round(y / s_y) + z_y, 0, 255)  (uint8: int8 between layers), or y (fp32), or acc

**Implicit GEMM** (groups whose per-group GEMM fills a tensor-core tile): ``M = N·OH·OW`` output
pixels, ``N = C_out / groups`` per group (grid axis 1), ``K = KH·KW·C_in/groups`` in (r, s, c) order,
channels innermost. The A tile is gathered from the input per k-block (no im2col buffer): ``k`` →
tap ``(r, s)`` and channel ``c``, pixel ``m`` → ``(n, oh, ow)``, ``ih = oh·stride − pad + r·dilation``;
out-of-image taps read the zero point (the quantized 0), so padding needs no copy. NHWC makes the
gathered A tile contiguous along ``c``, the fast K direction, and is the layout the CPU engines and
the fakes of the region ops already use, so an int8 value has one layout on both devices. Tensor cores
multiply ``s8 × s8``, so ``q_x − 128`` (exactly int8 for any ``uint8``) is the A operand and the
shift is undone once per channel in the epilogue: ``acc = Σ (q_x − 128)·W_q + (128 − z_x)·Σ_k W_q``.

**Direct** (depthwise and other narrow groups: ``tl.dot`` needs ≥ 16 rows, columns and depth): each
program owns a ``BLOCK_M × BLOCK_C`` tile of output pixels × channels and loops over the taps and the
group's input channels with int32 multiply-adds; channels are contiguous in NHWC, so every load is
coalesced. Conv1d runs as a height-1 conv2d in both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxcompress.triton_kernels._common import gemm_config, grouped_tile, identity_launch, pick_configs

OUT_DTYPES = (torch.uint8, torch.float32, torch.int32)
"""uint8: requantized at ``(s_y, z_y)``; float32: the dequantized ``y``; int32: the raw accumulator."""
MIN_DOT = 16
"""Smallest per-group output channels and GEMM depth the implicit GEMM takes (``tl.dot`` tile minimum)."""


def _direct_config(bm, bc, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=warps)


# M (pixels) is large for every CNN layer; N is 16..2048 channels; K from 27 (stem 3×3×3) to 4608.
_GEMM_CONFIGS = [gemm_config(*tile) for tile in (  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
    (128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 3, 8),
    (64, 64, 64, 4, 4), (128, 32, 64, 4, 4), (64, 32, 32, 5, 2),
)]
_DIRECT_CONFIGS = [_direct_config(64, 64, 4), _direct_config(128, 32, 4), _direct_config(32, 128, 4), _direct_config(16, 256, 4)]


@triton.jit
def _epilogue(acc, rows, oc, M, C_OUT, wscale_ptr, bias_ptr, res_ptr, y_ptr,
              n, oh, ow, srn, srh, srw, src, syn, syh, syw, syc,
              x_scale, res_scale, res_zero, out_inv_scale, out_zero,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, OUT_KIND: tl.constexpr):
    """Dequantize, bias, residual, ReLU and store ``acc`` [pixels, channels] (OUT_KIND: 0 uint8, 1 fp32, 2 int32)."""
    mask = (rows[:, None] < M) & (oc[None, :] < C_OUT)
    pixel_y = n.to(tl.int64) * syn + oh * syh + ow * syw
    y_tile = y_ptr + pixel_y[:, None] + oc[None, :] * syc
    if OUT_KIND == 2:
        tl.store(y_tile, acc, mask=mask)
    else:
        scale = x_scale * tl.load(wscale_ptr + oc, mask=oc < C_OUT, other=0.0)
        y = acc.to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + oc, mask=oc < C_OUT, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            pixel_r = n.to(tl.int64) * srn + oh * srh + ow * srw
            r = tl.load(res_ptr + pixel_r[:, None] + oc[None, :] * src, mask=mask, other=0)
            y += res_scale * (r.to(tl.float32) - res_zero)
        if RELU:
            y = tl.maximum(y, 0.0)
        if OUT_KIND == 0:
            q = tl.minimum(tl.maximum(y * out_inv_scale + out_zero, 0.0), 255.0)
            tl.store(y_tile, (q + 0.5).to(tl.uint8), mask=mask)  # round half up (q ≥ 0: truncation is floor)
        else:
            tl.store(y_tile, y, mask=mask)


@triton.autotune(configs=pick_configs(_GEMM_CONFIGS, [gemm_config(16, 16, 32, 1, 4, group_m=2)]),
                 key=["M_BUCKET", "N_G", "K", "C_G", "OUT_KIND"])
@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, wsum_ptr, wscale_ptr, bias_ptr, res_ptr, y_ptr,
    M, M_BUCKET, H, W, OH, OW, C_G, N_G, KW, K, C_OUT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxh, sxw, sxc, swn, swc, swh, sww, srn, srh, srw, src, syn, syh, syw, syc,
    x_zero, x_scale, res_scale, res_zero, out_inv_scale, out_zero,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, OUT_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N_G, BLOCK_M, BLOCK_N, GROUP_M)
    group = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    oc = group * N_G + cols
    ow = rows % OW
    oh = (rows // OW) % OH
    n = rows // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_pixel = x_ptr + n.to(tl.int64) * sxn + (group * C_G) * sxc
    w_channel = w_ptr + oc.to(tl.int64) * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        c = ks % C_G
        tap = ks // C_G
        r = tap // KW
        s = tap % KW
        ih = ih0[:, None] + r[None, :] * dil_h
        iw = iw0[:, None] + s[None, :] * dil_w
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (rows[:, None] < M) & (ks[None, :] < K)
        a = tl.load(x_pixel[:, None] + ih * sxh + iw * sxw + c[None, :] * sxc, mask=inside, other=0)
        a = tl.where(inside, a.to(tl.int32) - 128, x_zero - 128).to(tl.int8)
        b_mask = (ks[:, None] < K) & (cols[None, :] < N_G)
        b = tl.load(w_channel[None, :] + c[:, None] * swc + r[:, None] * swh + s[:, None] * sww, mask=b_mask, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    wsum = tl.load(wsum_ptr + oc, mask=cols < N_G, other=0)
    acc += (128 - x_zero) * wsum[None, :]
    in_group = tl.where(cols < N_G, oc, C_OUT)  # columns past this group's channels are masked like past C_OUT
    _epilogue(acc, rows, in_group, M, C_OUT, wscale_ptr, bias_ptr, res_ptr, y_ptr, n, oh, ow,
              srn, srh, srw, src, syn, syh, syw, syc, x_scale, res_scale, res_zero, out_inv_scale, out_zero,
              HAS_BIAS, HAS_RESIDUAL, RELU, OUT_KIND)


@triton.autotune(configs=pick_configs(_DIRECT_CONFIGS, [_direct_config(16, 16, 4)]),
                 key=["M_BUCKET", "C_OUT", "C_G", "KH", "KW", "OUT_KIND"])
@triton.jit
def _conv_direct_kernel(
    x_ptr, w_ptr, wscale_ptr, bias_ptr, res_ptr, y_ptr,
    M, M_BUCKET, H, W, OH, OW, C_G, N_G, KH, KW, C_OUT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxh, sxw, sxc, swn, swc, swh, sww, srn, srh, srw, src, syn, syh, syw, syc,
    x_zero, x_scale, res_scale, res_zero, out_inv_scale, out_zero,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, OUT_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    oc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    first_input_channel = (oc // N_G) * C_G
    ow = rows % OW
    oh = (rows // OW) % OH
    n = rows // (OW * OH)
    x_pixel = x_ptr + n.to(tl.int64) * sxn
    w_channel = w_ptr + oc.to(tl.int64) * swn
    valid = (rows[:, None] < M) & (oc[None, :] < C_OUT)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
    for r in range(0, KH):
        ih = oh * stride_h - pad_h + r * dil_h
        for s in range(0, KW):
            iw = ow * stride_w - pad_w + s * dil_w
            inside = valid & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None]
            tap = x_pixel + ih * sxh + iw * sxw
            for c in range(0, C_G):
                a = tl.load(tap[:, None] + (first_input_channel + c)[None, :] * sxc, mask=inside, other=0)
                w = tl.load(w_channel + c * swc + r * swh + s * sww, mask=oc < C_OUT, other=0)
                acc += tl.where(inside, a.to(tl.int32) - x_zero, 0) * w.to(tl.int32)[None, :]
    _epilogue(acc, rows, oc, M, C_OUT, wscale_ptr, bias_ptr, res_ptr, y_ptr, n, oh, ow,
              srn, srh, srw, src, syn, syh, syw, syc, x_scale, res_scale, res_zero, out_inv_scale, out_zero,
              HAS_BIAS, HAS_RESIDUAL, RELU, OUT_KIND)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def uses_implicit_gemm(weight_q: torch.Tensor, groups: int) -> bool:
    """The implicit GEMM needs ≥ 16 output channels per group and a GEMM depth of ≥ 16; else direct."""
    return weight_q.shape[0] // groups >= MIN_DOT and weight_q[0].numel() >= MIN_DOT


def weight_sums(weight_q: torch.Tensor) -> torch.Tensor:
    """``Σ_k W_q[n, k]`` per output channel (int32): undoes the ``q_x − 128`` shift of the implicit GEMM."""
    return weight_q.flatten(1).sum(1, dtype=torch.int32)


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(2)


def _nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a [N, C, H, W] tensor in the kernels' (n, h, w, c) argument order."""
    return t.stride(0), t.stride(2), t.stride(3), t.stride(1)


def int8_conv(
    x: torch.Tensor, x_scale: float, x_zero_point: int, weight_q: torch.Tensor, weight_scale: torch.Tensor,
    bias: torch.Tensor | None, stride, padding, dilation, groups: int,
    output_scale: float = 1.0, output_zero_point: int = 0, relu: bool = False,
    residual: torch.Tensor | None = None, residual_scale: float = 1.0, residual_zero_point: int = 0,
    out_dtype: torch.dtype = torch.uint8, weight_sum: torch.Tensor | None = None, launch=identity_launch,
) -> torch.Tensor:
    """``x`` uint8 ``[N, C, H, W]`` or ``[N, C, L]`` (any strides; channels-last is the fast layout),
    ``weight_q`` int8 ``[C_out, C/groups, kH(, kW)]`` -> ``[N, C_out, OH(, OW)]`` of ``out_dtype``,
    channels-last (see the module docstring). ``weight_sum``: :func:`weight_sums`, precomputed by callers
    that cache it."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, not {out_dtype}")
    conv1d = x.dim() == 3
    if conv1d:  # a height-1 conv2d
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = stride, padding, dilation
    x4, w4 = _as_2d(x), _as_2d(weight_q)
    batch, _, H, W = x4.shape
    c_out, c_g, KH, KW = w4.shape
    OH, OW = output_size(H, KH, stride_h, pad_h, dil_h), output_size(W, KW, stride_w, pad_w, dil_w)
    y4 = torch.empty((batch, c_out, OH, OW), dtype=out_dtype, device=x.device, memory_format=torch.channels_last)
    r4 = _as_2d(residual) if residual is not None else y4
    M = batch * OH * OW
    common = (M, min(triton.next_power_of_2(max(M, 1)), 1 << 20), H, W, OH, OW, c_g, c_out // groups)
    strides = (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, *_nhwc_strides(x4), *w4.stride(), *_nhwc_strides(r4),
               *_nhwc_strides(y4))
    scalars = (int(x_zero_point), float(x_scale), float(residual_scale), float(residual_zero_point),
               1.0 / float(output_scale), float(output_zero_point))
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=bool(relu),
                 OUT_KIND=OUT_DTYPES.index(out_dtype))
    bias_arg = bias if bias is not None else weight_scale
    if uses_implicit_gemm(w4, groups):
        w_sum = weight_sums(w4) if weight_sum is None else weight_sum
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(c_out // groups, meta["BLOCK_N"]), groups)  # noqa: E731
        launch(_conv_gemm_kernel)[grid](
            x4, w4, w_sum, weight_scale, bias_arg, r4, y4, *common, KW, c_g * KH * KW, c_out, *strides, *scalars, **flags)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_C"]))  # noqa: E731
        launch(_conv_direct_kernel)[grid](
            x4, w4, weight_scale, bias_arg, r4, y4, *common, KH, KW, c_out, *strides, *scalars, **flags)
    return y4.squeeze(2) if conv1d else y4
