"""The int8 Triton kernels, run on the CPU by Triton's interpreter against float64/int64 references.

Not collected by pytest directly (``triton.jit`` and Triton's own ``@jit`` library functions decide at
import time whether they are interpreted): ``tests/test_int8_kernels.py`` runs this file in a fresh
process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_int8_kernels.py (sets TRITON_INTERPRET=1)"


@pytest.fixture(scope="module")
def kernels():
    names = ("quantize", "int8_gemm", "weight_only_gemm")
    return {name: importlib.import_module(f"fxcompress.triton_kernels.{name}") for name in names}


def _int8(*shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    return torch.trunc(y + 0.5 * torch.sign(y))


# (M, N, K): M = 1 (decode), sizes that are not multiples of the interpreter's 16×32×32 blocks
GEMM_SHAPES = [(1, 33, 40), (17, 48, 70), (40, 5, 100)]


@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_int8_mm_is_exact(kernels, M, N, K):
    a, b = _int8(M, K), _int8(N, K)
    assert torch.equal(kernels["int8_gemm"].int8_mm(a, b), (a.long() @ b.long().t()).int())


def test_int8_mm_reads_non_contiguous_operands_through_strides(kernels):
    a = _int8(70, 19).t()  # [19, 70] with strides (1, 19)
    b = _int8(32, 140)[:, ::2]  # [32, 70], stride 2 along K
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(kernels["int8_gemm"].int8_mm(a, b), (a.long() @ b.long().t()).int())


@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES[:2])
def test_int8_gemm_epilogue_dequantizes_adds_bias_and_activates(kernels, M, N, K, activation):
    a, b = _int8(M, K), _int8(N, K)
    row_scale, col_scale, bias = torch.rand(M, 1) / 100, torch.rand(N) / 100, torch.randn(N)
    y = kernels["int8_gemm"].int8_gemm_dequant(a, b, row_scale, col_scale, bias, activation)
    ref = (a.double() @ b.double().t()) * row_scale.double() * col_scale.double() + bias.double()
    ref = {"none": ref, "relu": torch.relu(ref), "gelu": torch.nn.functional.gelu(ref)}[activation]
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_int8_gemm_per_tensor_scale_and_bf16_output(kernels):
    a, b = _int8(9, 37), _int8(20, 37)
    scale, col_scale = torch.tensor([0.02]), torch.rand(20) / 50
    y = kernels["int8_gemm"].int8_gemm_dequant(a, b, scale, col_scale, None, out_dtype=torch.bfloat16)
    ref = (a.double() @ b.double().t()) * 0.02 * col_scale.double()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("M,K", [(1, 45), (7, 100), (3, 64)])
def test_quantize_rows_matches_reference(kernels, M, K):
    x = torch.randn(M, 2 * K)[:, ::2] * 3  # non-contiguous rows
    q, scale = kernels["quantize"].quantize_rows(x)
    ref_scale = x.abs().amax(dim=1, keepdim=True) / 127
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(q, _round_half_away(x * (1 / scale)).to(torch.int8))
    assert q.abs().max().item() == 127  # the row absmax maps to ±127


def test_quantize_rows_static_scale_clamps(kernels):
    x = torch.randn(5, 33)
    x[2, 4] = 100.0  # outlier beyond the calibrated range
    static = torch.tensor([0.01])
    q, scale = kernels["quantize"].quantize_rows(x, static_scale=static)
    assert torch.equal(q, _round_half_away(x / 0.01).clamp(-127, 127).to(torch.int8))
    assert scale.shape == (5, 1) and torch.all(scale == 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 37, 70), (18, 40, 33)])
def test_weight_only_gemm_matches_dequantized_linear(kernels, M, N, K, dtype):
    x = torch.randn(M, K).to(dtype)
    w, scale, bias = _int8(N, K), torch.rand(N) / 100, torch.randn(N)
    y = kernels["weight_only_gemm"].weight_only_gemm(x, w, scale, bias)
    ref = (x.double() @ w.double().t()) * scale.double() + bias.double()
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=tolerance, atol=tolerance)


def test_weight_only_gemm_non_contiguous_activation(kernels):
    x = torch.randn(40, 3).t()  # [3, 40], column-major
    w, scale = _int8(21, 80)[:, ::2], torch.rand(21) / 100
    y = kernels["weight_only_gemm"].weight_only_gemm(x, w, scale)
    torch.testing.assert_close(y.double(), (x.double() @ w.double().t()) * scale.double(), rtol=1e-5, atol=1e-5)


def test_kernels_are_interpreted(kernels):
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(kernels["int8_gemm"]._int8_gemm_kernel.fn, InterpretedFunction)
