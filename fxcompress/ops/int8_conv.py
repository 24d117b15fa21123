"""Static int8 convolutions and the int8 values passed between them (CPU, PyTorch's quantized engines).

An int8 value in a graph is a plain ``uint8`` tensor ``q`` with a per-tensor affine map fixed by
calibration, ``x ≈ s · (q − z)`` (``s`` a float, ``z`` an int in [0, 255]); ``s`` and ``z`` are
arguments of the ops that make and read ``q``, so they are constants of the graph. Quantized tensors
(``torch.quint8``) have no fake-tensor support, so they cannot cross an op boundary in an exported
graph; inside each op they are zero-copy views of the ``uint8`` storage (``Tensor.set_``).

* ``quantize_u8(x, s, z)`` / ``dequantize_u8(q, s, z)``: the region boundaries;
* ``int8_max_pool2d(q, ...)``: ``max_pool2d`` inside a region;
* ``int8_conv(q, s, z, W_q, s_w, b, stride, padding, dilation, groups, s_out, z_out, relu, engine,
  accum, s_acc, z_acc, s_mid, z_mid)``: ``q_out = quantize(act(conv(x, s_w ⊙ W_q, b) [+ accum]), s_out, z_out)``
  through ``quantized::conv2d[_relu]`` (conv1d runs as a height-1 conv2d). With ``accum`` (a
  residual, itself int8) oneDNN's fused ``conv2d_add[_relu]`` runs (on a copy of ``accum``: oneDNN
  sums into it in place); the other engines quantize the
  conv output at the calibrated ``(s_mid, z_mid)`` and run ``quantized::add[_relu]``.

The engine's prepacked weight is built lazily per weight tensor and cached (``qengine.prepacked``,
shared with the linear ops). 4-D int8 values are channels-last (the engines' native layout); the fake
implementations say so, so Inductor sees the real strides.

On CUDA the same ops have CUDA kernels (``register_kernel("cuda")``): ``int8_conv`` with
``engine="triton"`` runs the Triton implicit-GEMM conv (``fxcompress.triton_kernels.int8_conv``; the
residual add is fused into its epilogue, so ``s_mid, z_mid`` are unused), the other three are plain
ATen on ``uint8`` tensors (quantized tensors have next to no CUDA kernels). Same layouts on both devices.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils.flop_counter import register_flop_formula

from .qengine import check_engine, engine_available, engine_scope, per_channel_qweight, prepacked, silence_quantized_deprecation

CONV_ENGINES = ("x86", "fbgemm", "onednn")
"""Quantized engines with a static int8 convolution; which exist depends on the build."""
TRITON_ENGINE = "triton"
"""The CUDA implementation of ``int8_conv`` (a Triton kernel, not a quantized engine)."""
FUSED_ADD_ENGINES = ("onednn", TRITON_ENGINE)
"""Implementations that fuse the residual add into the conv (the others add in a second quantized op)."""


def _memory_format(dim: int) -> torch.memory_format:
    return torch.channels_last if dim == 4 else torch.contiguous_format


def _as_quantized(q: Tensor, scale: float, zero_point: int) -> Tensor:
    """A ``quint8`` view of the ``uint8`` tensor ``q`` (no copy)."""
    silence_quantized_deprecation()
    view = torch._empty_affine_quantized([0], scale=scale, zero_point=zero_point, dtype=torch.quint8)
    return view.set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())


def _as_uint8(qt: Tensor, dim: int) -> Tensor:
    """The ``uint8`` storage of a quantized tensor, in the layout the fake implementations promise."""
    qt = qt.contiguous(memory_format=_memory_format(dim))
    return torch.empty(0, dtype=torch.uint8).set_(qt.untyped_storage(), qt.storage_offset(), qt.shape, qt.stride())


@custom_op("fxcompress::quantize_u8", mutates_args=())
def quantize_u8(x: Tensor, scale: float, zero_point: int, quant_max: int = 255) -> Tensor:
    """``q = clamp(round(x / s) + z, 0, quant_max)`` as ``uint8`` (channels-last when 4-D)."""
    x = x.float().contiguous(memory_format=_memory_format(x.dim()))
    silence_quantized_deprecation()
    return _clamp_top(_as_uint8(torch.quantize_per_tensor(x, scale, zero_point, torch.quint8), x.dim()), quant_max)


def _clamp_top(q: Tensor, quant_max: int) -> Tensor:
    """``q`` capped at ``quant_max`` in place: on a 7-bit grid a value beyond the calibrated range (128..255)
    would make the next conv's int16 pair sums saturate (see :func:`saturates_full_range`)."""
    return q.clamp_max_(quant_max) if quant_max < 255 else q


@quantize_u8.register_fake
def _(x, scale, zero_point, quant_max=255):
    return torch.empty(x.shape, dtype=torch.uint8, memory_format=_memory_format(x.dim()))


@custom_op("fxcompress::dequantize_u8", mutates_args=())
def dequantize_u8(q: Tensor, scale: float, zero_point: int) -> Tensor:
    """``x = s · (q − z)`` in fp32, contiguous (float ops after a region may ``view`` it)."""
    return _as_quantized(q, scale, zero_point).dequantize().contiguous()


@dequantize_u8.register_fake
def _(q, scale, zero_point):
    return torch.empty(q.shape, dtype=torch.float32)


def _prepack_conv(weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], engine: str,
                  stride: tuple, padding: tuple, dilation: tuple, groups: int):
    with engine_scope(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qweight = per_channel_qweight(weight_q if weight_q.dim() == 4 else weight_q.unsqueeze(2), weight_scale)
        return torch.ops.quantized.conv2d_prepack(
            qweight, None if bias is None else bias.detach().float(), list(stride), list(padding), list(dilation), groups)


def conv2d_geometry(dim: int, stride, padding, dilation) -> tuple[tuple, tuple, tuple]:
    """Stride/padding/dilation of the conv2d that computes a conv of input rank ``dim`` (conv1d: height 1)."""
    if dim == 4:
        return tuple(stride), tuple(padding), tuple(dilation)
    return (1, *stride), (0, *padding), (1, *dilation)


@custom_op("fxcompress::int8_conv", mutates_args=())
def int8_conv(
    x: Tensor, x_scale: float, x_zero_point: int, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
    output_scale: float, output_zero_point: int, relu: bool, engine: str,
    accum: Optional[Tensor] = None, accum_scale: float = 1.0, accum_zero_point: int = 0,
    mid_scale: float = 1.0, mid_zero_point: int = 0, output_quant_max: int = 255,
) -> Tensor:
    """Static int8 ``act(conv(x) [+ accum])`` from and to int8 values (see the module docstring), the
    output capped at ``output_quant_max`` (the top of the activation grid)."""
    check_engine(x, engine, "int8_conv")
    dim = x.dim()
    geometry = conv2d_geometry(dim, stride, padding, dilation)
    packed = prepacked.get(weight_q, weight_scale, bias, engine, pack=_prepack_conv, config=(*geometry, groups))
    qx = _as_quantized(x if dim == 4 else x.unsqueeze(2), x_scale, x_zero_point)
    ops = torch.ops.quantized
    with engine_scope(engine):
        if accum is None:
            y = (ops.conv2d_relu if relu else ops.conv2d)(qx, packed, output_scale, output_zero_point)
        else:
            accum = accum if dim == 4 else accum.unsqueeze(2)
            if engine in FUSED_ADD_ENGINES:  # oneDNN writes the sum into the accumulator: give it a copy
                qa = _as_quantized(accum.clone(memory_format=torch.channels_last), accum_scale, accum_zero_point)
                y = (ops.conv2d_add_relu if relu else ops.conv2d_add)(qx, qa, packed, output_scale, output_zero_point)
            else:
                qa = _as_quantized(accum, accum_scale, accum_zero_point)
                mid = ops.conv2d(qx, packed, mid_scale, mid_zero_point)
                y = (ops.add_relu if relu else ops.add)(mid, qa.contiguous(memory_format=torch.channels_last),
                                                         output_scale, output_zero_point)
    return _clamp_top(_as_uint8(y if dim == 4 else y.squeeze(2), dim), output_quant_max)


@int8_conv.register_fake
def _(x, x_scale, x_zero_point, weight_q, weight_scale, bias, stride, padding, dilation, groups, *args, **kwargs):
    spatial = []
    for i, size in enumerate(x.shape[2:]):
        kernel = weight_q.shape[2 + i]
        spatial.append((size + 2 * padding[i] - dilation[i] * (kernel - 1) - 1) // stride[i] + 1)
    return torch.empty((x.shape[0], weight_q.shape[0], *spatial), dtype=torch.uint8, memory_format=_memory_format(x.dim()))


@custom_op("fxcompress::int8_max_pool2d", mutates_args=())
def int8_max_pool2d(q: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                    ceil_mode: bool) -> Tensor:
    """``max_pool2d`` of an int8 value (same ``(s, z)``: max commutes with the monotone map).

    ATen's uint8 ``max_pool2d`` rejects channels-last inputs; the quantized kernel takes them."""
    y = torch.nn.functional.max_pool2d(_as_quantized(q, 1.0, 0), kernel_size, stride or kernel_size, padding, dilation,
                                       ceil_mode=ceil_mode)
    return _as_uint8(y, 4)


@int8_max_pool2d.register_fake
def _(q, kernel_size, stride, padding, dilation, ceil_mode):
    y = torch.nn.functional.max_pool2d(torch.empty(q.shape, device="meta"), kernel_size, stride or kernel_size, padding,
                                       dilation, ceil_mode=ceil_mode)
    return torch.empty(y.shape, dtype=torch.uint8, memory_format=torch.channels_last)


def conv_engine_available(engine: str) -> bool:
    return engine in CONV_ENGINES and engine_available(engine)


@functools.lru_cache(maxsize=None)
def saturates_full_range(engine: str) -> bool:
    """Whether ``engine``'s u8·s8 conv loses precision with full-range (0..255) activations on this CPU.

    Without VNNI the x86 kernels multiply with VPMADDUBSW, which adds two u8·s8 products into an int16
    and saturates at 32767 (255·127·2 = 64770). Measured, not read from CPU flags: a 1×1 conv whose
    exact output is 160 is run once with every input 255 and every weight 127."""
    channels = 32
    q = torch.full((1, channels, 1, 1), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    weight = torch.full((1, channels, 1, 1), 127, dtype=torch.int8)
    exact = 255 * 127 * channels
    y = int8_conv(q, 1.0, 0, weight, torch.ones(1), None, [1, 1], [0, 0], [1, 1], 1, exact / 160, 0, False, engine)
    return int(y.flatten()[0]) != 160


def activation_quant_max(engines: tuple[str, ...]) -> int:
    """The top of the uint8 activation grid: 255, or 127 (7-bit, as PyTorch's ``reduce_range``) where any of
    ``engines`` saturates at full range on this CPU."""
    return 127 if any(saturates_full_range(e) for e in engines if conv_engine_available(e)) else 255


@register_flop_formula(torch.ops.fxcompress.int8_conv)
def _int8_conv_flop(x_shape, x_scale, x_zero_point, w_shape, *args, out_shape=None, **kwargs) -> int:
    # 2 · N · C_out · (C_in / groups · kernel) · output positions, as for aten.convolution
    positions = 1
    for d in out_shape[2:]:
        positions *= d
    per_output = 1
    for d in w_shape[1:]:
        per_output *= d
    return 2 * out_shape[0] * out_shape[1] * per_output * positions


# --- CUDA: the Triton conv and ATen bodies of the region ops --------------------------------------

def quantize_u8_aten(x: Tensor, scale: float, zero_point: int, quant_max: int = 255) -> Tensor:
    """``quantize_u8`` in plain ATen (the CUDA body): ``clamp(round(x · (1/s)) + z, 0, quant_max)``, round half even."""
    q = torch.round(x.float() * (1.0 / scale)).add_(zero_point).clamp_(0, quant_max).to(torch.uint8)
    return q.contiguous(memory_format=_memory_format(x.dim()))


def dequantize_u8_aten(q: Tensor, scale: float, zero_point: int) -> Tensor:
    return (q.float() - zero_point).mul_(scale).contiguous()


def int8_max_pool2d_aten(q: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool) -> Tensor:
    """``max_pool2d`` through fp16 (exact for 0..255; CUDA's max_pool2d has no uint8 kernel)."""
    y = torch.nn.functional.max_pool2d(q.half(), kernel_size, stride or kernel_size, padding, dilation, ceil_mode=ceil_mode)
    return y.to(torch.uint8).contiguous(memory_format=torch.channels_last)


def _pack_for_triton(weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], engine: str):
    """Input channels innermost (the implicit GEMM's K order) and the per-channel weight sums."""
    from fxcompress.triton_kernels.int8_conv import weight_sums  # Triton is optional: imported on CUDA only

    return weight_q.detach().movedim(1, -1).contiguous().movedim(-1, 1), weight_sums(weight_q.detach())


def _int8_conv_triton(x, x_scale, x_zero_point, weight_q, weight_scale, bias, stride, padding, dilation, groups,
                      output_scale, output_zero_point, relu, engine, accum=None, accum_scale=1.0, accum_zero_point=0,
                      mid_scale=1.0, mid_zero_point=0, output_quant_max=255):
    if engine != TRITON_ENGINE:
        raise RuntimeError(f"fxcompress::int8_conv on CUDA runs engine={TRITON_ENGINE!r}, not {engine!r}: re-run the int8 pass on this device")
    try:
        from fxcompress.triton_kernels import int8_conv as kernels
    except ImportError as exc:
        raise RuntimeError("fxcompress::int8_conv on CUDA needs Triton; install it with `pip install triton`") from exc
    weight, weight_sum = prepacked.get(weight_q, weight_scale, bias, TRITON_ENGINE, pack=_pack_for_triton)
    y = kernels.int8_conv(x, x_scale, x_zero_point, weight, weight_scale, bias, stride, padding, dilation, groups,
                          output_scale, output_zero_point, relu, accum, accum_scale, accum_zero_point, weight_sum=weight_sum)
    return _clamp_top(y, output_quant_max)


quantize_u8.register_kernel("cuda")(quantize_u8_aten)
dequantize_u8.register_kernel("cuda")(dequantize_u8_aten)
int8_max_pool2d.register_kernel("cuda")(int8_max_pool2d_aten)
int8_conv.register_kernel("cuda")(_int8_conv_triton)
