"""The int8 custom operators that the ``int8`` pass rewrites linear layers into.

Registered under the ``fxcompress`` namespace when this module is imported (``fxcompress.ops`` imports
it: the passes and :func:`fxcompress.load` do), so ``torch.export`` keeps them as single nodes
(save/load round-trips them) and ``torch.compile`` traces them without graph breaks. Where CUDA and Triton exist they are
``torch.library.triton_op`` s (Inductor sees the Triton kernels and can fuse around them); elsewhere
plain ``torch.library.custom_op`` s with the same schemas, because ``triton_op`` scans its body with
Inductor's utilities when it is defined (importing Inductor costs ~2 s that a CPU-only user would
pay for nothing). The Triton kernels are imported on first CUDA use. Each op has

* a CUDA implementation: Triton kernels from ``fxcompress.triton_kernels`` launched through
  ``torch.library.wrap_triton``;
* CPU implementations through ATen (``torch._int_mm`` for the int8 GEMM) and, as the separate op
  ``int8_linear_qengine``, PyTorch's quantized engines (FBGEMM/x86/oneDNN/QNNPACK prepacked dynamic
  linear; the prepacked weight is built lazily per weight tensor and cached, see :mod:`.qengine`);
* a fake implementation (shape only);
* a FLOP formula for ``torch.utils.flop_counter`` (2·M·N·K, as for ``aten.linear``).

``int8_linear_by_rows`` holds one int8 weight and runs one of two of these engines by the row count of its
input (decode vs prefill, chosen separately by the pass). Which implementation a node uses is chosen by measurement in the ``int8`` pass (``passes/_int8_lowering.py``).
``int8_embedding`` (the weight-only table lookup of ``Int8(embeddings=True)``) is one ATen gather on every device.

Shapes: ``x [..., K]``; ``weight_q [N, K]`` int8; ``weight_scale [N]`` fp32 (``W ≈ s_w ⊙ W_q``
row-wise); ``bias [N]`` or None; the result is ``[..., N]`` in ``x.dtype``.
"""

from __future__ import annotations

import functools
import importlib.util
import types
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton
from torch.utils.flop_counter import register_flop_formula

from fxcompress.triton_kernels import ACTIVATIONS, EPS  # constants only: imports no Triton

from .qengine import check_engine, engine_scope, per_channel_qweight, prepacked, reduce_range

@functools.cache
def _kernels() -> types.SimpleNamespace:
    try:
        from fxcompress.triton_kernels import int8_gemm, quantize, weight_only_gemm
    except ImportError as exc:  # Triton is optional off Linux x86-64; the CPU path needs only ATen
        raise RuntimeError("fxcompress int8 ops on CUDA need Triton; install it with `pip install triton`") from exc
    return types.SimpleNamespace(int8_gemm=int8_gemm, quantize=quantize, weight_only_gemm=weight_only_gemm)


def _on_gpu(x: Tensor) -> bool:
    return x.device.type == "cuda"


def _triton_ops() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def _define(name: str, fake: Callable) -> Callable[[Callable], object]:
    """``triton_op`` where CUDA + Triton exist (its fake traces the body), else ``custom_op`` + ``fake``."""

    def register(fn: Callable):
        if _triton_ops():
            return triton_op(name, mutates_args=())(fn)
        op = custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return register


def _linear_fake(x: Tensor, weight_q: Tensor, *args, **kwargs) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


def _linear_static_fake(x: Tensor, input_scale: Tensor, weight_q: Tensor, *args, **kwargs) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


def _quantize_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _as_rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")


# --- ATen (CPU) building blocks -------------------------------------------------------------------

def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [N, K] -> (W_q int8, s_w fp32 [N])`` with ``W ≈ s_w[:, None] · W_q``: the weight format of every int8 op."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantization_error(weight: Tensor, weight_q: Tensor, scale: Tensor) -> float:
    """``‖W − s_w ⊙ W_q‖_F / ‖W‖_F`` of a weight in that format."""
    w = weight.detach().double()
    return ((w - weight_q.double() * scale.double()[:, None]).norm() / w.norm().clamp(min=1e-30)).item()


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
    return _activate(y, activation)


def _activate(y: Tensor, activation: str) -> Tensor:
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

@_define("fxcompress::quantize_per_token", _quantize_fake)
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., K] -> (q int8 [..., K], s fp32 [..., 1])`` with ``x ≈ s ⊙ q``, ``s = max_k |x| / 127``."""
    rows = _as_rows(x)
    if _on_gpu(x):
        q, scale = _kernels().quantize.quantize_rows(rows, launch=wrap_triton)
    else:
        q, scale = quantize_rows_aten(rows)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


@_define("fxcompress::int8_linear", _linear_fake)
def int8_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], activation: str = "none") -> Tensor:
    """Dynamic W8A8: ``act(linear(x, W, b))`` with ``x`` quantized per token at run time."""
    _check_activation(activation)
    rows = _as_rows(x)
    if _on_gpu(x):
        q, row_scale = _kernels().quantize.quantize_rows(rows, launch=wrap_triton)
        y = _kernels().int8_gemm.int8_gemm_dequant(q, weight_q, row_scale, weight_scale, bias, activation, x.dtype, launch=wrap_triton)
    else:
        y = _w8a8_aten(rows, weight_q, weight_scale, bias, activation).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


@_define("fxcompress::int8_linear_static", _linear_static_fake)
def int8_linear_static(
    x: Tensor, input_scale: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], activation: str = "none"
) -> Tensor:
    """Static W8A8: like ``int8_linear`` but ``x`` uses the calibrated per-tensor scale ``input_scale`` (1 element)."""
    _check_activation(activation)
    rows = _as_rows(x)
    if _on_gpu(x):
        q, _ = _kernels().quantize.quantize_rows(rows, static_scale=input_scale, launch=wrap_triton)
        y = _kernels().int8_gemm.int8_gemm_dequant(q, weight_q, input_scale, weight_scale, bias, activation, x.dtype, launch=wrap_triton)
    else:
        y = _w8a8_aten(rows, weight_q, weight_scale, bias, activation, static_scale=input_scale).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


@_define("fxcompress::int8_weight_only_linear", _linear_fake)
def int8_weight_only_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """W8A16: ``linear(x, s_w ⊙ W_q, b)`` with the weight dequantized inside the matmul, ``x`` kept float."""
    rows = _as_rows(x)
    if _on_gpu(x):
        y = _kernels().weight_only_gemm.weight_only_gemm(rows, weight_q, weight_scale, bias, launch=wrap_triton)
    elif x.dtype in (torch.bfloat16, torch.float16):
        y = torch._weight_int8pack_mm(rows.contiguous(), weight_q, weight_scale.to(x.dtype))
        y = y.add_(bias) if bias is not None else y
    else:
        # ATen's int8-weight GEMM is slow for fp32 activations (measured 30x an fp32 GEMM on AVX-512):
        # dequantize the weight, one float GEMM. The int8 pass times this against float.
        weight = (weight_q.float() * weight_scale.float()[:, None]).to(x.dtype)
        y = torch.nn.functional.linear(rows, weight, bias)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


@custom_op("fxcompress::int8_weight_only_linear_bf16", mutates_args=())
def int8_weight_only_linear_bf16(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """W8A16 for float32 activations: ``x`` rounded to bf16 for ATen's int8-weight GEMM (``_weight_int8pack_mm``,
    AVX-512 BF16 kernels on the CPU), the result back in ``x.dtype``. The rounding costs ~2^-9 relative per
    activation; the int8 pass's fidelity contract decides whether that is within the weight-only scheme's error."""
    rows = _as_rows(x).to(torch.bfloat16).contiguous()
    y = torch._weight_int8pack_mm(rows, weight_q, weight_scale.to(torch.bfloat16)).to(x.dtype)
    y = y.add_(bias) if bias is not None else y
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


int8_weight_only_linear_bf16.register_fake(_linear_fake)


def _prepack(weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], engine: str):
    with engine_scope(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated; it is this engine's input format
        return torch.ops.quantized.linear_prepack(per_channel_qweight(weight_q, weight_scale),
                                                  None if bias is None else bias.detach().float())


def _qengine_fake(x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], activation: str, engine: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


@custom_op("fxcompress::int8_linear_qengine", mutates_args=())
def int8_linear_qengine(
    x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], activation: str, engine: str
) -> Tensor:
    """Dynamic W8A8 through a PyTorch quantized engine (CPU): ``x`` is quantized per tensor (u8,
    asymmetric) at run time, ``W`` per output channel (the same ``W_q, s_w`` as ``int8_linear``)."""
    _check_activation(activation)
    check_engine(x, engine, "int8_linear_qengine")
    packed = prepacked.get(weight_q, weight_scale, bias, engine, _prepack)
    rows = _as_rows(x).float().contiguous()
    y = _activate(torch.ops.quantized.linear_dynamic(rows, packed, reduce_range(engine)), activation)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight_q.shape[0])


int8_linear_qengine.register_fake(_qengine_fake)


def _bucket_engine(impl: str, x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                   float_weight: Optional[Tensor], activation: str) -> Tensor:
    if impl == "float":
        if float_weight is None:
            raise ValueError("fxcompress::int8_linear_by_rows: the 'float' engine needs float_weight")
        return _activate(torch.nn.functional.linear(x, float_weight, bias), activation)
    if impl in ("dequantize", "int8_weight_only"):
        return _activate(int8_weight_only_linear(x, weight_q, weight_scale, bias), activation)
    if impl == "int8_weight_only_bf16":
        return _activate(int8_weight_only_linear_bf16(x, weight_q, weight_scale, bias), activation)
    if impl in ("int_mm", "triton"):
        return int8_linear(x, weight_q, weight_scale, bias, activation)
    if impl.startswith("qengine:"):
        return int8_linear_qengine(x, weight_q, weight_scale, bias, activation, impl.removeprefix("qengine:"))
    raise ValueError(f"fxcompress::int8_linear_by_rows: unknown engine {impl!r}; one of {BUCKET_ENGINES} or 'qengine:<engine>'")


BUCKET_ENGINES = ("float", "dequantize", "int_mm", "triton", "int8_weight_only", "int8_weight_only_bf16")
"""What a row bucket of :func:`int8_linear_by_rows` can run: the int8 pass's candidates, plus ``dequantize``
(``s_w ⊙ W_q`` then one float GEMM: the ``float`` choice of a layer that stores only int8)."""


@custom_op("fxcompress::int8_linear_by_rows", mutates_args=())
def int8_linear_by_rows(
    x: Tensor, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], float_weight: Optional[Tensor], activation: str,
    small: str, large: str, max_small_rows: int,
) -> Tensor:
    """One int8 linear, two engines chosen by the row count ``M`` of ``x`` at run time: ``small`` for
    ``M <= max_small_rows`` (decoding), ``large`` otherwise (prefill, batches). Engines are named as the
    int8 pass's candidates (``int_mm``, ``qengine:fbgemm``, ...); ``float`` runs ``float_weight`` (stored only
    when a bucket needs it), ``dequantize`` runs ``s_w ⊙ W_q`` as one float GEMM."""
    _check_activation(activation)
    rows = x.numel() // max(x.shape[-1], 1)
    return _bucket_engine(small if rows <= max_small_rows else large, x, weight_q, weight_scale, bias, float_weight, activation)


@int8_linear_by_rows.register_fake
def _by_rows_fake(x: Tensor, weight_q: Tensor, *args) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_q.shape[0]))


@custom_op("fxcompress::int8_embedding", mutates_args=())
def int8_embedding(indices: Tensor, weight_q: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Weight-only int8 embedding lookup: ``(s_w ⊙ W_q)[indices]`` in ``dtype``, gathering the int8 rows and
    their scales only (``W_q [V, D]`` int8, ``s_w [V]``: per row, the LM head's per-output-channel scale of a
    tied table, so one ``W_q, s_w`` serves both)."""
    rows = torch.nn.functional.embedding(indices, weight_q)
    return rows.to(dtype).mul_(torch.nn.functional.embedding(indices, weight_scale[:, None]).to(dtype))


@int8_embedding.register_fake
def _int8_embedding_fake(indices: Tensor, weight_q: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    return indices.new_empty((*indices.shape, weight_q.shape[1]), dtype=dtype)


# --- FLOP formulas (the report counts MACs through FlopCounterMode) -------------------------------

def _linear_flops(x_shape, weight_shape) -> int:
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * weight_shape[0] * weight_shape[1]


@register_flop_formula([
    torch.ops.fxcompress.int8_linear, torch.ops.fxcompress.int8_weight_only_linear, torch.ops.fxcompress.int8_weight_only_linear_bf16,
    torch.ops.fxcompress.int8_linear_qengine, torch.ops.fxcompress.int8_linear_by_rows,
])
def _int8_linear_flop(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.fxcompress.int8_linear_static)
def _int8_linear_static_flop(x_shape, scale_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _linear_flops(x_shape, weight_shape)
