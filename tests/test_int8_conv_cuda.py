"""The CUDA lowering of static int8 convs, as far as it can be checked without a GPU: the ``triton``
candidate of the conv family, the ATen bodies of the region ops registered for CUDA, the refusal of
``engine="triton"`` on the CPU. The Triton kernel itself runs under the interpreter
(``tests/int8_conv_kernel_checks.py`` through ``tests/test_int8_kernels.py``)."""

from __future__ import annotations

import types

import pytest
import torch

from fxcompress import tuning
from fxcompress.ops import int8_conv as int8_conv_ops
from fxcompress.passes import _int8_conv
from fxcompress.passes._int8_lowering import Lowering

fxops = torch.ops.fxcompress


def test_triton_is_the_cuda_candidate_of_the_int8_conv_family():
    candidates = tuning.family(_int8_conv.FAMILY).candidates
    triton = candidates["triton"]
    on_cuda, on_cpu = types.SimpleNamespace(device=torch.device("cuda")), types.SimpleNamespace(device=torch.device("cpu"))
    assert triton.available(on_cuda) and not triton.available(on_cpu)
    assert not any(candidates[f"qengine:{e}"].available(on_cuda) for e in int8_conv_ops.CONV_ENGINES)
    names = [n for n, c in candidates.items() if c.available(on_cuda)]
    assert sorted(names) == ["float", "triton"]
    assert tuning.family(_int8_conv.FAMILY).static_rule(on_cuda, names) == "triton"  # tune=False on CUDA
    lowering = Lowering(triton, tuning.Choice("triton", "test"), {}, {})
    assert lowering.engine == "triton" and "triton" in int8_conv_ops.FUSED_ADD_ENGINES  # the residual add is fused


def test_cuda_bodies_of_the_region_ops_match_the_cpu_ops():
    x = torch.randn(2, 8, 7, 6) * 3
    scale, zero = 6.0 / 255, 128
    q = fxops.quantize_u8(x, scale, zero)
    q_aten = int8_conv_ops.quantize_u8_aten(x, scale, zero)
    assert q_aten.dtype == torch.uint8 and q_aten.is_contiguous(memory_format=torch.channels_last)
    assert (q_aten.int() - q.int()).abs().max() <= 1 and (q_aten == q).float().mean() > 0.999  # ties may round apart
    assert torch.equal(int8_conv_ops.dequantize_u8_aten(q, scale, zero), fxops.dequantize_u8(q, scale, zero))
    pool = fxops.int8_max_pool2d(q, [3, 3], [2, 2], [1, 1], [1, 1], False)
    pool_aten = int8_conv_ops.int8_max_pool2d_aten(q, [3, 3], [2, 2], [1, 1], [1, 1], False)
    assert torch.equal(pool_aten, pool) and pool_aten.is_contiguous(memory_format=torch.channels_last)
    q1 = fxops.quantize_u8(torch.randn(2, 8, 11), scale, zero)  # conv1d values are plain contiguous
    assert int8_conv_ops.quantize_u8_aten(q1.float(), 1.0, 0).is_contiguous()


def test_the_triton_engine_on_a_cpu_tensor_is_refused_with_the_fix():
    x = fxops.quantize_u8(torch.randn(1, 4, 5, 5), 0.05, 128)
    w_q, w_scale = torch.randint(-127, 128, (16, 4, 3, 3), dtype=torch.int8), torch.full((16,), 0.01)
    with pytest.raises(RuntimeError, match="re-run the int8 pass"):
        fxops.int8_conv(x, 0.05, 128, w_q, w_scale, None, [1, 1], [1, 1], [1, 1], 1, 0.1, 128, False, "triton")

