"""The properties the fuzzer checks on every random model (shared by tests/test_fuzz.py and bench/fuzz.py)."""

from __future__ import annotations

import copy
import warnings

import torch

import fxcompress
from fxcompress.passes import LowRank, PruneChannels
from tests.fuzz_models import example
from tests.test_prune_channels import mask_equivalence

OTHER_BATCH = 3


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12))


def _eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _check_other_batch(gm: torch.nn.Module, model: torch.nn.Module, tolerance: float | None, what: str) -> None:
    """The dynamic-shape contract: the result runs at another batch size (and matches when ``tolerance``)."""
    batch = gm.meta["fxcompress_shapes"].inputs[0].dims[0]
    assert batch.dynamic, f"{what}: the capture kept the batch static ({batch.reason})"
    x = example(OTHER_BATCH, seed=1)
    got = _eager(gm, x)
    assert got.shape[0] == OTHER_BATCH, f"{what}: batch {OTHER_BATCH} gave shape {tuple(got.shape)}"
    if tolerance is not None:
        error = relative_error(got, _eager(model, x))
        assert error <= tolerance, f"{what}: relative error {error:.3g} at batch {OTHER_BATCH}"


def check_fold_bn(model: torch.nn.Module) -> None:
    """``fold_bn`` is exact (the pass manager verifies it) and keeps the batch dynamic."""
    gm = fxcompress.optimize(model, (example(),), passes=["eliminate_identity", "fold_bn"], report=False)
    _check_other_batch(gm, model, 1e-5, "fold_bn")


def check_prune(model: torch.nn.Module, ratio: float, seed: int) -> None:
    """Mask equivalence at ``ratio``; the pass itself keeps shapes and the dynamic batch."""
    error, _ = mask_equivalence(copy.deepcopy(model), (example(),), ratio=ratio, seed=seed)
    scale = float(_eager(model, example()).abs().max())
    assert error <= 1e-4 * max(scale, 1.0), f"prune mask equivalence at ratio {ratio:.2f}: error {error:.3g}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxcompress.FxCompressWarning)
        gm = fxcompress.optimize(model, (example(),), passes=[PruneChannels(ratio=ratio)], report=False)
    _check_other_batch(gm, model, None, f"prune_channels(ratio={ratio:.2f})")


def check_low_rank_full_rank(model: torch.nn.Module) -> None:
    """At full rank every factorization is exact: the outputs match at both batch sizes."""
    gm = fxcompress.optimize(model, (example(),), passes=[LowRank(rank=1.0)], report=False)
    error = relative_error(_eager(gm, example()), _eager(model, example()))
    assert error <= 1e-4, f"low_rank(rank=1.0): relative error {error:.3g}"
    _check_other_batch(gm, model, 1e-4, "low_rank(rank=1.0)")


def check_all(model: torch.nn.Module, ratio: float, seed: int) -> None:
    check_fold_bn(model)
    check_prune(model, ratio, seed)
    check_low_rank_full_rank(model)
