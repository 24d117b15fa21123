"""The factorizations of ``low_rank``, one class each: the matrices whose SVDs define it, the chain of
layers (stages) replacing the weight at given ranks, the single weight that chain equals, and its MACs;
and the functions over any of them (:func:`factorize`, :func:`run_stages`, :func:`reconstruct`).

The equations are in :mod:`fxcompress.passes.low_rank`'s docstring. ``svds`` are ``(U, S, Vᵀ)`` of
:meth:`Factorization.matrices` (``Vᵀ`` ``None``: a whitened output basis, see ``_whitening``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from fxcompress import tuning
from fxcompress.passes import _whitening

LINEAR = torch.ops.aten.linear.default
CONV_OPS = {1: torch.ops.aten.conv1d.default, 2: torch.ops.aten.conv2d.default}  # by spatial dims
Geometry = tuple[list[int], list[int], list[int]]  # a conv's (stride, padding, dilation), one entry per spatial dim


@dataclass(frozen=True)
class Stage:
    """One layer of the factorized chain; ``geometry`` is (stride, padding, dilation) for convs."""

    weight: torch.Tensor
    geometry: Geometry | None = None


class Factorization:
    name: ClassVar[str] = ""

    def matrices(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The matrices whose SVDs define the factorization (float32 for the decomposition)."""
        raise NotImplementedError

    def stages(self, weight: torch.Tensor, svds: list, ranks: tuple[int, ...], geometry: Geometry | None) -> list[Stage]:
        """The chain replacing ``weight`` at ``ranks`` (the bias goes on the last stage)."""
        raise NotImplementedError

    def reconstruct(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Ŵ, the single weight equal to the chain of stage weights (float32)."""
        raise NotImplementedError

    def macs(self, weight_shape: torch.Size, in_shape: tuple, out_shape: tuple, ranks: tuple[int, ...]) -> int:
        """MACs of the chain at the layer's recorded input/output shapes."""
        raise NotImplementedError


def _pointwise(weight: torch.Tensor) -> Geometry:
    ones = [1] * (weight.dim() - 2)
    return ones, [0] * len(ones), ones


class _Gemm(Factorization):
    """Linear or 1×1 conv: truncated SVD ``W ≈ (U_r S_r) V_rᵀ``, two layers C→r→N."""

    def matrices(self, weight):
        return [weight.float().reshape(*weight.shape[:2])]

    def stages(self, weight, svds, ranks, geometry):
        (u, s, vh), r = svds[0], ranks[0]
        out_ch, in_ch = weight.shape[:2]
        if vh is None:  # a whitened output basis U: Ŵ = U_r (U_rᵀ W)
            first, second = _whitening.basis_factors(weight.reshape(out_ch, in_ch), u, r)
        else:
            first, second = vh[:r], u[:, :r] * s[:r]
        ones = [1] * (weight.dim() - 2)
        first = first.reshape(r, in_ch, *ones).to(weight.dtype)
        second = second.reshape(out_ch, r, *ones).to(weight.dtype)
        return self._chain(first, second, geometry, weight)

    def _chain(self, first, second, geometry, weight) -> list[Stage]:
        raise NotImplementedError

    def reconstruct(self, weights):
        first, second = weights
        return (second.flatten(1) @ first.flatten(1)).reshape(second.shape[0], first.shape[1], *first.shape[2:])

    def macs(self, weight_shape, in_shape, out_shape, ranks):
        out_ch, in_ch = weight_shape[:2]
        return math.prod(out_shape) // out_ch * ranks[0] * (in_ch + out_ch)


class Linear(_Gemm):
    name = "linear"

    def _chain(self, first, second, geometry, weight):
        return [Stage(first), Stage(second)]


class Pointwise(_Gemm):
    """A 1×1 conv keeps its stride/padding on the first layer."""

    name = "pointwise"

    def _chain(self, first, second, geometry, weight):
        return [Stage(first, geometry), Stage(second, _pointwise(weight))]


class Tucker2(Factorization):
    """k×k conv: ``W ≈ G ×₀ U_out ×₁ U_in`` (HOSVD), 1×1 C→r_in, k×k r_in→r_out, 1×1 r_out→N."""

    name = "tucker2"

    def matrices(self, weight):
        w = weight.float()
        out_ch, in_ch = w.shape[:2]
        return [w.transpose(0, 1).reshape(in_ch, -1), w.reshape(out_ch, -1)]

    def stages(self, weight, svds, ranks, geometry):
        (r_in, r_out), dtype = ranks, weight.dtype
        out_ch, in_ch = weight.shape[:2]
        ones = [1] * (weight.dim() - 2)
        u_in, u_out = svds[0][0][:, :r_in], svds[1][0][:, :r_out]
        core = torch.einsum("nc...,nr,cs->rs...", weight.float(), u_out, u_in)
        return [
            Stage(u_in.T.reshape(r_in, in_ch, *ones).to(dtype), _pointwise(weight)),
            Stage(core.to(dtype), geometry),
            Stage(u_out.reshape(out_ch, r_out, *ones).to(dtype), _pointwise(weight)),
        ]

    def reconstruct(self, weights):
        first, core, last = weights
        return torch.einsum("rs...,nr,sc->nc...", core, last.flatten(1), first.flatten(1))

    def macs(self, weight_shape, in_shape, out_shape, ranks):
        out_ch, in_ch = weight_shape[:2]
        r_in, r_out = ranks
        in_positions, out_positions = math.prod(in_shape) // in_ch, math.prod(out_shape) // out_ch
        return in_positions * in_ch * r_in + out_positions * (r_in * r_out * math.prod(weight_shape[2:]) + r_out * out_ch)


class Separable(Factorization):
    """2-d k×k conv: SVD of ``M[(c,i),(n,j)] = W[n,c,i,j]``, a k_h×1 conv C→r then a 1×k_w conv r→N."""

    name = "separable"

    def matrices(self, weight):
        w = weight.float()
        out_ch, in_ch, k_h, k_w = w.shape
        return [w.permute(1, 2, 0, 3).reshape(in_ch * k_h, out_ch * k_w)]

    def stages(self, weight, svds, ranks, geometry):
        (u, s, vh), r = svds[0], ranks[0]
        out_ch, in_ch, k_h, k_w = weight.shape
        (s_h, s_w), (p_h, p_w), (d_h, d_w) = geometry
        vertical = (u[:, :r] * s[:r]).reshape(in_ch, k_h, r).permute(2, 0, 1).unsqueeze(-1)
        horizontal = vh[:r].reshape(r, out_ch, k_w).permute(1, 0, 2).unsqueeze(2)
        return [
            Stage(vertical.contiguous().to(weight.dtype), ([s_h, 1], [p_h, 0], [d_h, 1])),
            Stage(horizontal.contiguous().to(weight.dtype), ([1, s_w], [0, p_w], [1, d_w])),
        ]

    def reconstruct(self, weights):
        vertical, horizontal = weights
        return torch.einsum("rci,nrj->ncij", vertical.squeeze(-1), horizontal.squeeze(2))

    def macs(self, weight_shape, in_shape, out_shape, ranks):
        out_ch, in_ch, k_h, k_w = weight_shape
        out_positions = math.prod(out_shape) // out_ch
        mid_positions = out_positions // out_shape[-1] * in_shape[-1]
        return mid_positions * in_ch * k_h * ranks[0] + out_positions * ranks[0] * out_ch * k_w


FACTORIZATIONS: dict[str, Factorization] = {f.name: f for f in (Linear(), Pointwise(), Tucker2(), Separable())}
"""By kind: ``"linear"``, ``"pointwise"`` (1×1 conv), ``"tucker2"`` (ranks ``(r_in, r_out)``) and ``"separable"``."""


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD through a QR of the tall orientation: T = Q R, R = U' S Vᵀ ⇒ T = (Q U') S Vᵀ.

    The SVD then runs on the small square R. LAPACK's gesdd does this itself for tall inputs but not
    for wide ones, whose thin SVD was 5-6x slower than their transpose's (512 x 4608, 1 thread);
    QR first is as fast as the better orientation whichever LAPACK is installed.
    """
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix
    q, r = torch.linalg.qr(tall)
    u_r, s, vh = torch.linalg.svd(r, full_matrices=False)
    u = q @ u_r
    return (vh.T, s, u.T) if wide else (u, s, vh)


def factorize(
    weight: torch.Tensor,
    kind: str,
    ranks: tuple[int, ...],
    geometry: Geometry | None = None,
    svds: list | None = None,
) -> list[Stage]:
    """The chain of layers replacing one with ``weight`` (the bias goes on the last one).

    ``kind``: a key of :data:`~fxcompress.passes._factorizations.FACTORIZATIONS`; ``geometry``: the
    conv's (stride, padding, dilation), one entry per spatial dim.
    """
    factorization = FACTORIZATIONS[kind]
    svds = svds if svds is not None else [svd(m) for m in factorization.matrices(weight)]
    return factorization.stages(weight, svds, ranks, geometry)


def run_stages(x: torch.Tensor, stages: list[Stage], bias: torch.Tensor | None = None) -> torch.Tensor:
    """Evaluate a factorized chain eagerly (as the rewritten graph does)."""
    for i, stage in enumerate(stages):
        op, tail = stage_call(stage)
        x = op(x, stage.weight, bias if i == len(stages) - 1 else None, *tail)
    return x


def reconstruct(kind: str, stages: list[Stage]) -> torch.Tensor:
    """Ŵ, the single weight equivalent to the chain of stages (bias excluded)."""
    return FACTORIZATIONS[kind].reconstruct([stage.weight.float() for stage in stages])


def stage_call(stage: Stage) -> tuple[Callable, tuple]:
    """(op, trailing args after (input, weight, bias)) for one stage."""
    if stage.geometry is None:
        return LINEAR, ()
    return CONV_OPS[stage.weight.dim() - 2], (*stage.geometry, 1)


def format_ranks(ranks: tuple[int, ...]) -> int | str:
    """A layer's ranks for the report: one number, or ``r_in/r_out``."""
    return ranks[0] if len(ranks) == 1 else "/".join(map(str, ranks))


def measured_speedup(op: Callable, weight: torch.Tensor, in_shape: tuple, geometry: Geometry | None,
                     stages: list[Stage]) -> float:
    """Median latency of the original layer (``op`` with ``weight``) over that of the factorized chain, on random input."""
    x = torch.randn(in_shape, dtype=weight.dtype, device=weight.device)
    original_tail = (*geometry, 1) if geometry else ()
    timings = tuning.compare({"original": lambda: op(x, weight, None, *original_tail),
                              "factorized": lambda: run_stages(x, stages)}, x.device, min_run_time=0.05)
    return timings["original"].median_ms / timings["factorized"].median_ms
