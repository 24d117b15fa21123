"""Helpers shared by the int8 kernels: interpreter detection, launch hook, fused activations."""

from __future__ import annotations

import os
from typing import Callable

import triton
import triton.language as tl

from fxcompress.triton_kernels import ACTIVATIONS


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_configs(gpu_configs: list[triton.Config], interpreter_configs: list[triton.Config]) -> list[triton.Config]:
    """Autotuning runs every config; under the interpreter that costs seconds each, so use one small config."""
    return interpreter_configs if interpreting() else gpu_configs


def gemm_config(bm: int, bn: int, bk: int, stages: int, warps: int, group_m: int = 8) -> triton.Config:
    """One tile configuration of a grouped-tile GEMM kernel (``BLOCK_M/N/K``, ``GROUP_M``)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_stages=stages, num_warps=warps)


def identity_launch(kernel: Callable) -> Callable:
    """Default launch hook; ``torch.library.wrap_triton`` is passed instead inside a ``triton_op``."""
    return kernel


def activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    return ACTIVATIONS.index(activation)


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to a (row tile, column tile), GROUP_M row tiles at a time for L2 reuse."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_size
    pid_n = (pid % tiles_per_group) // group_size
    return pid_m, pid_n
