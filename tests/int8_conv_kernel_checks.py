"""The Triton int8 conv (``fxcompress.triton_kernels.int8_conv``) under Triton's interpreter.

Run by ``tests/test_int8_kernels.py`` in a fresh process with ``TRITON_INTERPRET=1`` (see
``int8_kernel_checks.py``). References: the integer convolution computed by ``torch`` in float64 on
the zero-point-shifted integers (exact: every partial sum is an integer far below 2^53).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fxcompress.triton_kernels import int8_conv as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_int8_kernels.py (sets TRITON_INTERPRET=1)"

# (input shape, C_out, kernel, stride, padding, dilation, groups); tiny: the interpreter runs each program in numpy
GEOMETRIES = {
    "1x1": ((2, 16, 4, 5), 16, 1, 1, 0, 1, 1),
    "3x3": ((1, 8, 6, 5), 16, 3, 1, 1, 1, 1),
    "5x5": ((1, 4, 7, 6), 16, 5, 1, 2, 1, 1),
    "3x3 stride 2": ((2, 8, 7, 7), 16, 3, 2, 1, 1, 1),
    "3x3 dilation 2": ((1, 8, 7, 6), 16, 3, 1, 2, 2, 1),
    "3x3 groups 2": ((1, 8, 5, 5), 32, 3, 1, 1, 1, 2),
    "depthwise 3x3": ((2, 8, 5, 6), 8, 3, 1, 1, 1, 8),
    "depthwise x2 stride 2": ((1, 8, 7, 7), 16, 3, 2, 1, 1, 8),
    "narrow 3x3 (direct)": ((1, 3, 6, 6), 4, 3, 2, 1, 1, 1),
    "conv1d k3 stride 2": ((2, 8, 11), 16, 3, 2, 1, 1, 1),
    "conv1d depthwise k5": ((1, 8, 9), 8, 5, 1, 2, 1, 8),
}


def _case(shape, c_out, kernel, groups, zero_point):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (c_out, shape[1] // groups, *[kernel] * (len(shape) - 2)), dtype=torch.int8)
    return x, w, zero_point


def _integer_conv(x, zero_point, w, stride, padding, dilation, groups):
    conv = F.conv2d if x.dim() == 4 else F.conv1d
    return conv(x.double() - zero_point, w.double(), None, stride, padding, dilation, groups)


def _run(x, w, stride, padding, dilation, groups, zero_point=128, **kwargs):
    spatial = x.dim() - 2
    geometry = ([stride] * spatial, [padding] * spatial, [dilation] * spatial)
    scale = kwargs.pop("weight_scale", torch.ones(w.shape[0]))
    return kernels.int8_conv(x, kwargs.pop("x_scale", 1.0), zero_point, w, scale, kwargs.pop("bias", None), *geometry, groups,
                             **kwargs)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_int32_accumulator_is_exact(name):
    """Zero points 0 (after ReLU) and 128 alternate over the geometries: both kernels see both."""
    shape, c_out, kernel, stride, padding, dilation, groups = GEOMETRIES[name]
    zero_point = 128 * (list(GEOMETRIES).index(name) % 2)
    x, w, z = _case(shape, c_out, kernel, groups, zero_point)
    acc = _run(x, w, stride, padding, dilation, groups, z, out_dtype=torch.int32)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), _integer_conv(x, z, w, stride, padding, dilation, groups).long())


def test_both_kernels_compute_the_same_conv(monkeypatch):
    """The shapes above pick one kernel each; the direct one also computes an implicit-GEMM-sized conv."""
    shape, c_out, kernel, stride, padding, dilation, groups = GEOMETRIES["3x3 groups 2"]
    x, w, z = _case(shape, c_out, kernel, groups, 128)
    assert kernels.uses_implicit_gemm(w, groups)
    gemm = _run(x, w, stride, padding, dilation, groups, z, out_dtype=torch.int32)
    monkeypatch.setattr(kernels, "uses_implicit_gemm", lambda weight, groups: False)
    assert torch.equal(_run(x, w, stride, padding, dilation, groups, z, out_dtype=torch.int32), gemm)


def test_kernel_choice_by_group_width():
    assert kernels.uses_implicit_gemm(torch.empty(32, 8, 3, 3), 2)
    assert not kernels.uses_implicit_gemm(torch.empty(8, 1, 3, 3), 8)  # depthwise
    assert not kernels.uses_implicit_gemm(torch.empty(8, 16, 1, 1), 1)  # 8 output channels: below a dot tile


def _fused_reference(x, z, w, geometry, w_scale, bias, residual, relu, x_scale=0.02, r_scale=0.05, r_zero=128):
    y = _integer_conv(x, z, w, *geometry) * x_scale * w_scale.double().view(1, -1, *[1] * (x.dim() - 2))
    y = y + bias.double().view(1, -1, *[1] * (x.dim() - 2))
    if residual is not None:
        y = y + r_scale * (residual.double() - r_zero)
    return y.relu() if relu else y


@pytest.mark.parametrize("name", ["3x3 stride 2", "depthwise 3x3", "conv1d k3 stride 2"])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_epilogue_scale_bias_residual_relu(name, relu):
    shape, c_out, kernel, stride, padding, dilation, groups = GEOMETRIES[name]
    x, w, z = _case(shape, c_out, kernel, groups, 128)
    w_scale, bias = torch.rand(c_out) / 100, torch.randn(c_out)
    geometry = (stride, padding, dilation, groups)
    out_shape = _integer_conv(x, z, w, *geometry).shape
    residual = torch.randint(0, 256, out_shape, dtype=torch.uint8)
    y = _run(x, w, *geometry, z, x_scale=0.02, weight_scale=w_scale, bias=bias, relu=relu, residual=residual,
             residual_scale=0.05, residual_zero_point=128, out_dtype=torch.float32)
    ref = _fused_reference(x, z, w, geometry, w_scale, bias, residual, relu)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["3x3", "depthwise x2 stride 2"])
def test_requantized_uint8_output_keeps_regions_int8(name):
    shape, c_out, kernel, stride, padding, dilation, groups = GEOMETRIES[name]
    x, w, z = _case(shape, c_out, kernel, groups, 0)
    w_scale, bias = torch.rand(c_out) / 100, torch.randn(c_out)
    geometry = (stride, padding, dilation, groups)
    ref = _fused_reference(x, z, w, geometry, w_scale, bias, None, relu=True)
    out_scale = ref.max().item() / 255 * 0.8  # the top 20 % saturates at 255
    q = _run(x, w, *geometry, z, x_scale=0.02, weight_scale=w_scale, bias=bias, relu=True,
             output_scale=out_scale, output_zero_point=0)
    expected = torch.floor(ref / out_scale + 0.5).clamp(0, 255)
    assert q.dtype == torch.uint8 and q.is_contiguous(memory_format=torch.channels_last)
    difference = (q.double() - expected).abs()
    assert difference.max() <= 1  # fp32 vs float64 epilogue: a tie may round the other way
    assert (difference == 0).float().mean() > 0.99
    assert (q == 255).any() and (q == 0).any()  # saturation and ReLU both exercised


def test_nchw_input_read_through_strides():
    shape, c_out, kernel, stride, padding, dilation, groups = GEOMETRIES["3x3 stride 2"]
    x, w, z = _case(shape, c_out, kernel, groups, 128)
    nchw = x.contiguous()
    assert not nchw.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_run(nchw, w, stride, padding, dilation, groups, z, out_dtype=torch.int32),
                       _run(x, w, stride, padding, dilation, groups, z, out_dtype=torch.int32))


def test_bad_out_dtype_is_refused():
    x, w, z = _case((1, 4, 3, 3), 16, 1, 1, 0)
    with pytest.raises(ValueError, match="out_dtype"):
        _run(x, w, 1, 0, 1, 1, z, out_dtype=torch.float16)


def test_cuda_body_of_the_int8_conv_op_packs_the_weight_and_fuses_the_residual():
    """``fxcompress::int8_conv``'s CUDA kernel (called here on CPU tensors, which the interpreter runs)."""
    from fxcompress.ops import int8_conv as int8_conv_ops

    shape, c_out, kernel, stride, padding, dilation, groups = GEOMETRIES["3x3 groups 2"]
    x, w, z = _case(shape, c_out, kernel, groups, 128)
    w_scale, bias = torch.rand(c_out) / 100, torch.randn(c_out)
    geometry = (stride, padding, dilation, groups)
    residual = torch.randint(0, 256, _integer_conv(x, z, w, *geometry).shape, dtype=torch.uint8)
    ref = _fused_reference(x, z, w, geometry, w_scale, bias, residual, relu=True)
    out_scale = ref.max().item() / 255
    args = (x, 0.02, z, w, w_scale, bias, [stride] * 2, [padding] * 2, [dilation] * 2, groups, out_scale, 0, True)
    q = int8_conv_ops._int8_conv_triton(*args, "triton", residual, 0.05, 128)
    assert ((q.double() - torch.floor(ref / out_scale + 0.5).clamp(0, 255)).abs() <= 1).all()
    with pytest.raises(RuntimeError, match="engine='triton'"):
        int8_conv_ops._int8_conv_triton(*args, "x86")
