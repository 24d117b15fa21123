"""Data-aware low rank: the whitened truncation's output error is exactly its discarded singular values."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.manager import apply_pass
from fxcompress.pass_base import PassContext
from fxcompress.passes.low_rank import LowRank


class TwoLayers(nn.Module):
    def __init__(self, c: int = 32, hidden: int = 24):
        super().__init__()
        self.fc = nn.Linear(c, hidden)
        self.pw = nn.Conv2d(hidden, 20, 1)

    def forward(self, x):  # x: N × T × C (a linear on a 3-D input), then a 1×1 conv over T×1 "pixels"
        y = self.fc(x)
        return self.pw(y.transpose(1, 2).unsqueeze(-1)).squeeze(-1)


def subspace_inputs(batches: int, rows: int, c: int = 32, dim: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Inputs confined to a random ``dim``-dimensional subspace of R^c (a singular Gram matrix)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(c, dim, generator=gen))[0] * torch.linspace(4, 1, dim)
    return [torch.randn(2, rows, dim, generator=gen) @ basis.T for _ in range(batches)]


def layer_outputs(gm, xs, name):
    from fxcompress.verify import node_values

    return torch.cat([node_values(gm, (x,), {}, {name})[name] for x in xs]).double()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    calibration = subspace_inputs(4, 10)
    gm = capture(model, (calibration[0],))
    return model, gm, calibration


def run(gm, calibration, **options):
    import copy

    gm = copy.deepcopy(gm)
    ctx = PassContext((calibration[0],), {}, calibration=calibration)
    return gm, apply_pass(LowRank(**options), gm, ctx)


def linear_name(gm) -> str:
    return gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)[-1].name


def test_output_error_equals_discarded_whitened_singular_values(setup):
    model, gm, calibration = setup
    x = torch.cat(calibration).reshape(-1, 32).double()
    gram = x.T @ x
    chol = torch.linalg.cholesky(gram + 1e-9 * gram.diagonal().mean() * torch.eye(32, dtype=torch.float64))
    sigma = torch.linalg.svdvals(model.fc.weight.detach().double() @ chol)  # an independent root of XᵀX
    rank = 3
    reference = layer_outputs(gm, calibration, linear_name(gm))
    errors = {}
    for whiten in ("svd-llm", None):
        factored, result = run(gm, calibration, rank=rank, whiten=whiten, include=("fc",))
        errors[whiten] = (layer_outputs(factored, calibration, linear_name(factored)) - reference).square().sum().item()
    assert errors["svd-llm"] == pytest.approx(sigma[rank:].square().sum().item(), rel=1e-4)
    assert errors["svd-llm"] < 0.5 * errors[None]  # plain SVD keeps directions the inputs never excite
    row = run(gm, calibration, rank=rank, whiten="svd-llm", include=("fc",))[1].details[0]
    assert row["whitening"] == "svd-llm"
    expected = (sigma[rank:].square().sum() / sigma.square().sum()).sqrt().item()
    assert row["output_rel_error"] == pytest.approx(expected, rel=1e-3)


def test_full_rank_is_exact_off_the_calibration_subspace(setup):
    from fxcompress.passes import _whitening
    from fxcompress.statistics import layer_statistics

    model, gm, calibration = setup
    ctx = PassContext((calibration[0],), {}, calibration=calibration)
    (fc_stats,) = layer_statistics(gm, ctx, gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)).values()
    w = model.fc.weight.detach()
    u, _ = _whitening.whitened_svd(w, _whitening.input_root(fc_stats, "svd-llm")[0])
    first, second = _whitening.basis_factors(w, u, min(w.shape))
    x = torch.randn(3, 7, 32)  # not in the calibration subspace
    torch.testing.assert_close((x.double() @ first.T @ second.T).float(), x @ w.T, rtol=1e-5, atol=1e-5)


def test_target_macs_spends_rank_where_outputs_need_it(setup):
    model, gm, calibration = setup
    whitened, result = run(gm, calibration, target_macs=0.6, whiten="svd-llm")
    plain, _ = run(gm, calibration, target_macs=0.6)
    x = torch.cat(calibration)
    reference = model(x)
    assert result.rewritten
    assert (whitened(x) - reference).norm() < (plain(x) - reference).norm()


def test_optimize_takes_calibration_and_asvd_runs(setup):
    model, _, calibration = setup
    out = fxcompress.optimize(model, (calibration[0],), passes=[LowRank(rank=4, whiten="asvd")], calibration=calibration,
                              report=fxcompress.ReportConfig(latency=False))
    details = out.report.results["low_rank"].details
    assert out(calibration[1]).shape == model(calibration[1]).shape
    assert details and {d["whitening"] for d in details} == {"asvd"}


def test_bad_whiten_option():
    with pytest.raises(PassConfigError, match="whiten"):
        LowRank(rank=2, whiten="pca")
