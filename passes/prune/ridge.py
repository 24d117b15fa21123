"""The refit's ridge chosen from the data: per consumer by generalized cross-validation (``ridge="gcv"``),
or one value for the whole model by its output error on calibration batches (``ridge="model"``).

**GCV.** 
The refit of the kept columns ``k`` is a ridge regression of the removed columns' contribution
``T = X̃_R W̃_Rᵀ`` on ``X̃_k`` (unknowns ``V = W'_k − W̃_k``; the ridge pulls the refit toward the original
weights). With ``A = G̃[k, k] = QΛQᵀ``, ``B = G̃[k, R] W̃_Rᵀ`` and ``b = QᵀB``, everything GCV needs is in
the Gram matrix, so no held-out split is needed:

    RSS(λ) = ‖T‖² − Σ_i ‖b_i‖² (λ_i + 2λ) / (λ_i + λ)²,   df(λ) = Σ_i λ_i / (λ_i + λ),
    GCV(λ) = RSS(λ) / (1 − df(λ) / n)²,   ‖T‖² = tr(W̃_R G̃[R, R] W̃_Rᵀ)

over a log grid of ``λ`` relative to ``mean diag A``. GCV estimates the error on new inputs from the
same distribution, where the plain ``‖·‖²`` on the calibration rows only rewards fitting them: with
``n`` rows and ``|k|`` columns the in-sample fit is optimistic by about ``|k| / n``. In a sequential
stage ``G̃`` is the pruned model's Gram matrix (the regression of what was removed on what is kept,
on the inputs the layer now gets); the solve itself then uses the stage's full target.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxcompress.training import Batch

RELATIVE_GRID = torch.logspace(-5, 1, 31, dtype=torch.float64)
FIXED_FOR_SELECTION = 1e-3
"""The relative ridge of the reconstruction (OBS) unit choice under ``ridge="gcv"`` / ``"model"`` (one system for all units)."""


def gcv_ridge(gram: torch.Tensor, augmented: torch.Tensor, cols: torch.Tensor, rows: int) -> tuple[float, float]:
    """``(λ, λ / mean diag G̃[k, k])`` minimising GCV for refitting ``augmented`` (N × F) on the columns ``cols``."""
    removed = torch.as_tensor(sorted(set(range(gram.shape[0])) - set(cols.tolist())), dtype=torch.long)
    a = gram[cols][:, cols]
    scale = float(a.diagonal().mean().clamp(min=1e-12))
    if not len(removed):
        return FIXED_FOR_SELECTION * scale, FIXED_FOR_SELECTION
    w_removed = augmented[:, removed]
    target = torch.trace(w_removed @ gram[removed][:, removed] @ w_removed.T)
    eigenvalues, basis = torch.linalg.eigh(a)
    eigenvalues = eigenvalues.clamp(min=0)
    signal = (basis.T @ (gram[cols][:, removed] @ w_removed.T)).square().sum(1)
    lams = scale * RELATIVE_GRID[:, None]
    spread = eigenvalues[None, :] + lams
    rss = target - (signal[None, :] * (eigenvalues[None, :] + 2 * lams) / spread.square()).sum(1)
    dof = (eigenvalues[None, :] / spread).sum(1)
    gcv = rss.clamp(min=0) / (1 - dof / max(rows, 1)).clamp(min=1e-6).square()
    best = int(torch.argmin(gcv))
    return float(lams[best, 0]), float(RELATIVE_GRID[best])


MODEL_GRID = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
MODEL_CHECK_BATCHES = 4


@torch.no_grad()
def model_ridge(original: fx.GraphModule, trials: Callable[[list], Callable[[float], fx.GraphModule]],
                batches: list) -> tuple[float, dict]:
    """``ridge="model"``: the relative ridge of :data:`MODEL_GRID` whose pruned model, refit on the first
    calibration batches, best reproduces ``original``'s outputs on the last ones (a quarter, at most
    :data:`MODEL_CHECK_BATCHES`; relative squared error of all floating outputs), and every candidate's
    error. ``trials(fit_batches)`` gives ``ridge → pruned model`` refit on those batches' statistics.

    Each layer's refit matches its own output on the original inputs; how much to pull it toward the
    original weights so that the whole model still generalizes is a property of the model, measured here
    on calibration batches its refit did not see (never on evaluation data). With one batch there is
    nothing to hold out: the candidates are compared on it."""
    fit, check = split_batches(batches)
    error = held_out_error(original, check)
    trial = trials(fit)
    errors = {ridge: error(trial(ridge)) for ridge in MODEL_GRID}
    return min(errors, key=errors.get), errors


def split_batches(batches: list) -> tuple[list[Batch], list[Batch]]:
    """``(fit, check)``: the check part is the last quarter of the batches (at most
    :data:`MODEL_CHECK_BATCHES`); with one batch both are that batch."""
    batches = [b if isinstance(b, Batch) else Batch.of(b) for b in batches]
    held = min(MODEL_CHECK_BATCHES, max(1, len(batches) // 4)) if len(batches) > 1 else 0
    return (batches[:-held], batches[-held:]) if held else (batches, batches)


@torch.no_grad()
def held_out_error(original: fx.GraphModule, check: list[Batch]) -> Callable[[fx.GraphModule], float]:
    """``model → `` its relative squared error to ``original``'s floating outputs on the ``check`` batches."""
    references = [_float_leaves(original(*b.args, **b.kwargs)) for b in check]

    @torch.no_grad()
    def error(model: fx.GraphModule) -> float:
        total = energy = 0.0
        for batch, reference in zip(check, references):
            for got, want in zip(_float_leaves(model(*batch.args, **batch.kwargs)), reference):
                total += (got.double() - want.double()).square().sum().item()
                energy += want.double().square().sum().item()
        return total / max(energy, 1e-30)

    return error


def _float_leaves(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
