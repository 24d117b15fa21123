"""The int8 custom operators that the ``int8`` pass rewrites linear layers into.

Registered with ``torch.library.triton_op`` under the ``fxcompress`` namespace when this module is
imported (``import fxcompress`` does it), so ``torch.export`` keeps them as single nodes (save/load
round-trips them) and ``torch.compile`` traces into them without graph breaks. Each op has

* a CUDA implementation: Triton kernels from ``fxcompress.triton_kernels`` launched through
  ``torch.library.wrap_triton`` (Inductor sees and can fuse around them);
* a CPU implementation through ATen (``torch._int_mm`` for the int8 GEMM);
* a fake implementation (``triton_op`` traces the same Python function on fake tensors);
* a FLOP formula for ``torch.utils.flop_counter`` (2·M·N·K, as for ``aten.linear``).

Shapes: ``x [..., K]``; ``weight_q [N, K]`` int8; ``weight_scale [N]`` fp32 (``W ≈ s_w ⊙ W_q``
row-wise); ``bias [N]`` or None; the result is ``[..., N]`` in ``x.dtype``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton
from torch.utils.flop_counter import register_flop_formula

try:
    from fxcompress.triton_kernels import int8_gemm, quantize, weight_only_gemm
except ImportError:  # Triton is optional off Linux x86-64; the CPU path needs only ATen
    int8_gemm = quantize = weight_only_gemm = None

EPS = 1e-8
ACTIVATIONS = ("none", "relu", "gelu")


def _on_gpu(x: Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    if int8_gemm is None:
        raise RuntimeError("fxcompress int8 ops on CUDA need Triton; install it with `pip install triton`")
    return True


def _as_rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")


# --- ATen (CPU) building blocks -------------------------------------------------------------------

def quantize_rows_aten(x: Tensor, static_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``x [M, K] -> (q int8, s fp32 [M, 1])`` with ``x ≈ s ⊙ q``; ``s = absmax/127`` per row unless static.

    ``max(amax, -amin)`` is the row absmax: on the CPU two vectorised reductions beat
    ``abs().amax()`` and ``vector_norm(inf)`` (measured 1.5x and 16x faster at 1024x768).
    """
    x = x.float()
    if static_scale is None:
        absmax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
        scale = absmax.clamp_(min=EPS).div_(127.0)
        scaled = x * scale.reciprocal()  # |x / s| <= 127 by construction of s: no clamp needed
    else:
        scale = static_scale.float().reshape(1, 1)
        scaled = (x * scale.reciprocal()).clamp_(-127, 127)
    return scaled.round_().to(torch.int8), scale.expand(x.shape[0], 1)


def _dequantize_aten(acc: Tensor, row_scale: Tensor, col_scale: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    # same-dtype in-place passes: int32·fp32 mixed-dtype kernels are ~8x slower on the CPU
    y = acc.to(torch.float32).mul_(row_scale).mul_(col_scale)
    if bias is not None:
        y.add_(bias)
    if activation == "relu":
        y = torch.relu_(y)
    elif activation == "gelu":
        y = torch.nn.functional.gelu(y)
    return y


def _w8a8_aten(x2: Tensor, weight_q: Tensor, weight_scale: Tensor, bias, activation, static_scale=None) -> Tensor:
    q, row_scale = quantize_rows_aten(x2, static_scale)
    acc = torch._int_mm(q, weight_q.t())  # column-major B is the fast layout for oneDNN's s8s8s32
    return _dequantize_aten(acc, row_scale, weight_scale, bias, activation)


# --- the operators --------------------------------------------------------------------------------

@triton_op("fxcompress::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., K] -> (q int8 [..., K], s fp32 [..., 1])`` with ``x ≈ s ⊙ q``, ``s = max_k |x| / 127``."""
    rows = _as_rows(x)
    if _on_gpu(x):
        q, scale = quantize.quantize_rows(rows, launch=wrap_triton)
    else:
        q, scale = quantize_rows_aten(rows)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


@triton_op("fxcompress::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], activation: str = "none") -> Tensor:
    """Dynamic W8A8: ``act(linear(x, W, b))`` with ``x`` quantized per token at run time."""
    _check_activation(activation)
    rows = _as_rows(x)
    if _on_gpu(x):
        q, row_scale = quantize.quantize_rows(rows, launch=wrap_triton)
        y = int8_gemm.int8_gemm_dequant(q, weight_q, row_scale, weight_scale, bias, activation, x.dtype, launch=wrap_triton)
    else:
        y = _w8a8_aten(rows, weight_q, weight_scale, bias, activation).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


@triton_op("fxcompress::int8_linear_static", mutates_args=())
def int8_linear_static(
    x: Tensor, input_scale: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], activation: str = "none"
) -> Tensor:
    """Static W8A8: like ``int8_linear`` but ``x`` uses the calibrated per-tensor scale ``input_scale`` (1 element)."""
    _check_activation(activation)
    rows = _as_rows(x)
    if _on_gpu(x):
        q, _ = quantize.quantize_rows(rows, static_scale=input_scale, launch=wrap_triton)
        y = int8_gemm.int8_gemm_dequant(q, weight_q, input_scale, weight_scale, bias, activation, x.dtype, launch=wrap_triton)
    else:
        y = _w8a8_aten(rows, weight_q, weight_scale, bias, activation, static_scale=input_scale).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


@triton_op("fxcompress::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """W8A16: ``linear(x, s_w ⊙ W_q, b)`` with the weight dequantized inside the matmul, ``x`` kept float."""
    rows = _as_rows(x)
    if _on_gpu(x):
        y = weight_only_gemm.weight_only_gemm(rows, weight_q, weight_scale, bias, launch=wrap_triton)
    elif x.dtype in (torch.bfloat16, torch.float16):
        y = torch._weight_int8pack_mm(rows.contiguous(), weight_q, weight_scale.to(x.dtype))
        y = y.add_(bias) if bias is not None else y
    else:
        # ATen's int8-weight GEMM is slow for fp32 activations: dequantize the weight, one float GEMM.
        # The int8 pass keeps fp32 layers in float for this reason unless allow_slower=True.
        weight = (weight_q.float() * weight_scale.float()[:, None]).to(x.dtype)
        y = torch.nn.functional.linear(rows, weight, bias)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


# --- FLOP formulas (the report counts MACs through FlopCounterMode) -------------------------------

def _linear_flops(x_shape, weight_shape) -> int:
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * weight_shape[0] * weight_shape[1]


@register_flop_formula([torch.ops.fxcompress.int8_linear, torch.ops.fxcompress.int8_weight_only_linear])
def _int8_linear_flop(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.fxcompress.int8_linear_static)
def _int8_linear_static_flop(x_shape, scale_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x_shape, weight_shape)
