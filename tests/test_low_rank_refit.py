"""Closed-form refit of low_rank's whitened factors (``refit="independent" | "sequential"``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.manager import apply_pass
from fxcompress.pass_base import PassContext
from fxcompress.passes import _refit
from fxcompress.passes.low_rank import LowRank


def correlated_inputs(batches: int, rows: int, c: int, seed: int = 0) -> list[torch.Tensor]:
    """Strongly correlated inputs with a large common mean (as a GELU or LayerNorm output has)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, c, generator=gen) * torch.logspace(0, -2, c)
    offset = 3 * torch.randn(c, generator=gen)
    return [torch.randn(rows, c, generator=gen) @ mixing.T + offset for _ in range(batches)]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 48), nn.Linear(48, 40), nn.Linear(40, 16)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    calibration = correlated_inputs(4, 64, 32)
    return model, capture(model, (calibration[0],)), calibration


def compress(gm, calibration, **options):
    gm = copy.deepcopy(gm)
    result = apply_pass(LowRank(**options), gm, PassContext((calibration[0],), {}, calibration=calibration))
    return gm, result


def test_fit_error_is_irreducible_part_plus_discarded_spectrum():
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(12, 20, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    x = correlated_inputs(1, 200, 20, seed=2)[0].double()
    x_compressed = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64) + 0.5  # upstream error
    m, m_c = x.mean(0), x_compressed.mean(0)
    gram = (x_compressed - m_c).T @ (x_compressed - m_c)
    cross = (x - m).T @ (x_compressed - m_c)
    fit = _refit.fit(w, m, m_c, gram, cross, ridge=0.0)
    target = x @ w.T + b
    irreducible = (target - (x_compressed - m_c) @ fit.target.T - (m @ w.T + b)).square().sum()
    for rank in (3, 7, 12):
        u_r = fit.basis[:, :rank]
        approx = u_r @ (u_r.T @ fit.target)
        error = (target - x_compressed @ approx.T - fit.bias(w, b, approx)).square().sum()
        assert error.item() == pytest.approx((irreducible + fit.spectrum[rank:].square().sum()).item(), rel=1e-6)
    full = fit.basis @ (fit.basis.T @ fit.target)
    torch.testing.assert_close(full, fit.target)  # full rank: the least-squares fit itself


def test_full_rank_without_upstream_change_is_exact():
    w, b = torch.randn(10, 16, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    x = correlated_inputs(1, 100, 16)[0].double()
    m = x.mean(0)
    fit = _refit.fit(w, m, m, (x - m).T @ (x - m))
    full = fit.basis @ (fit.basis.T @ fit.target)
    torch.testing.assert_close(full, w)
    torch.testing.assert_close(fit.bias(w, b, full), b)


def output_error(gm, model, calibration) -> float:
    x = torch.cat(calibration)
    return (gm(x) - model(x)).norm().item()


def test_refit_reduces_output_error(mlp):
    model, gm, calibration = mlp
    errors = {refit: output_error(compress(gm, calibration, rank=6, whiten="svd-llm", refit=refit)[0], model, calibration)
              for refit in (None, "independent", "sequential")}
    assert errors["independent"] < errors[None]  # the bias takes the mean: rank goes to the fluctuations
    assert errors["sequential"] < 0.9 * errors["independent"]  # later layers undo earlier layers' error
    held_out = correlated_inputs(5, 64, 32)[4:]  # the calibration's distribution, a batch it does not contain
    assert output_error(compress(gm, calibration, rank=6, whiten="svd-llm", refit="sequential")[0], model, held_out) < \
        output_error(compress(gm, calibration, rank=6, whiten="svd-llm")[0], model, held_out)


def test_sequential_equals_independent_when_nothing_upstream_is_compressed(mlp):
    model, gm, calibration = mlp
    x = torch.cat(calibration)
    independent, _ = compress(gm, calibration, rank=5, whiten="svd-llm", refit="independent", include=("fc1",))
    sequential, result = compress(gm, calibration, rank=5, whiten="svd-llm", refit="sequential", include=("fc1",))
    assert result.rewritten == ["fc1"] and result.details[0]["whitening"] == "svd-llm, sequential refit"
    torch.testing.assert_close(sequential(x), independent(x), rtol=1e-5, atol=1e-5)


def test_refit_needs_svd_llm_whitening():
    with pytest.raises(PassConfigError, match="refit"):
        LowRank(rank=2, refit="sequential")
    with pytest.raises(PassConfigError, match="refit"):
        LowRank(rank=2, whiten="svd-llm", refit="yes")


class DampedBranch(nn.Module):
    """Two equal-shaped branches; one barely reaches the output."""

    def __init__(self):
        super().__init__()
        self.loud, self.quiet = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.loud(x) + 0.01 * self.quiet(x)


@pytest.mark.filterwarnings("ignore:low_rank.*rank 1")
def test_model_budget_error_spends_rank_where_the_output_needs_it():
    torch.manual_seed(0)
    model = DampedBranch().eval()
    calibration = correlated_inputs(4, 64, 32, seed=3)
    gm = capture(model, (calibration[0],))
    ranks, errors = {}, {}
    for budget_error in ("layer", "model"):
        compressed, result = compress(gm, calibration, target_macs=0.3, whiten="svd-llm", budget_error=budget_error)
        ranks[budget_error] = {d["layer"]: d["rank"] for d in result.details}
        errors[budget_error] = output_error(compressed, model, calibration)
    assert ranks["model"]["quiet"] < ranks["model"]["loud"]
    assert errors["model"] < 0.8 * errors["layer"]


def test_sequential_budget_is_honest_and_refits_whole_layers(mlp):
    from fxcompress.report import count_macs

    model, gm, calibration = mlp
    ctx = PassContext((calibration[0],), {})
    compressed, result = compress(gm, calibration, target_macs=0.5, whiten="svd-llm", refit="sequential")
    assert count_macs(compressed, ctx) <= 0.5 * count_macs(gm, ctx)
    whole = [d for d in result.details if d["kind"] == "refit (kept whole)"]
    factorized = [d for d in result.details if d["kind"] == "linear"]
    assert factorized and all(d["macs_after"] < d["macs_before"] for d in factorized)
    assert whole and all(d["macs_after"] == d["macs_before"] for d in whole)  # fc3 (16 outputs) stays whole
    assert {d["layer"] for d in result.details} == {"fc1", "fc2", "fc3"}
    x = torch.cat(calibration)
    independent, _ = compress(gm, calibration, target_macs=0.5, whiten="svd-llm", refit="independent")
    assert (compressed(x) - model(x)).norm() < (independent(x) - model(x)).norm()
