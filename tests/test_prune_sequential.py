"""Sequential calibration, paired (cross) statistics and reconstruction (OBS) importance of ``prune_channels``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from fxcompress import ir
from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.passes import PruneChannels
from fxcompress.passes.prune import compensate as compensation
from fxcompress.passes.prune.graph import analyze
from fxcompress.passes.prune.sequential import _ObsSystem, group_consumers
from fxcompress.statistics import LAYER_OPS, collect_statistics
from tests.calibrated_pruning import calibrated_case, pruned, pruned_error


def mlp3() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8)).eval()


@pytest.fixture(scope="module")
def mlp_case():
    return calibrated_case(mlp3(), rows=128)


def test_sequential_refit_is_never_worse_than_one_shot(mlp_case):
    """Same units (l1), so the last consumer's sequential refit — the least-squares fit of the original outputs
    on the inputs it really gets — cannot be worse than the one-shot refit on the original inputs."""
    one_shot, details = pruned_error(mlp_case, importance="l1", compensate="lstsq")
    sequential, seq_details = pruned_error(mlp_case, importance="l1", compensate="lstsq", sequential=True)
    removed = lambda rows: [r["removed_units"] for r in rows if "removed_units" in r]  # noqa: E731
    assert removed(details) == removed(seq_details) == [24, 24]
    assert [r["stage"] for r in seq_details if "compensated" in r] == [0, 1]
    assert sequential <= one_shot * (1 + 1e-3)
    assert sequential < 0.97 * one_shot  # the upstream error is taken out, not only not compounded


def test_reconstruction_importance_beats_activation(mlp_case):
    errors = {imp: pruned_error(mlp_case, importance=imp, compensate="lstsq")[0] for imp in ("activation", "reconstruction")}
    assert errors["reconstruction"] < 0.9 * errors["activation"]
    sequential, _ = pruned_error(mlp_case, importance="reconstruction", compensate="lstsq", sequential=True)
    assert sequential < errors["reconstruction"]


def test_sequential_ratio_zero_is_exact_and_input_graph_untouched(mlp_case):
    model, calibration, _ = mlp_case
    gm, result = pruned(mlp_case, ratio=0.0, importance="reconstruction", compensate="lstsq", sequential=True)
    assert not result.changed
    torch.testing.assert_close(gm(calibration[0]), model(calibration[0]), rtol=1e-5, atol=1e-5)


def test_obs_costs_are_the_refit_error_increase():
    """Greedy OBS: each step's predicted cost equals the increase of the ridge refit objective, exactly."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 5)).eval()
    batches = [torch.randn(64, 8) @ torch.randn(8, 8) for _ in range(2)]
    gm = capture(model, (batches[0],))
    graph = analyze(gm)
    (gid, stage), = [(g, c) for g, c in enumerate(group_consumers(gm, graph)) if c and c[0].weight_target == "2.weight"]
    stats = collect_statistics(gm, batches, [stage[0].node], progress=False)[stage[0].node.name]
    ridge, group = 1e-2, graph.groups[gid]
    system = _ObsSystem(gm, stage[0], stats, group, ridge)
    weight, bias = model[2].weight.detach(), model[2].bias.detach()
    hessian, rhs = compensation.ridge_system(weight, bias, stats, ridge)
    augmented = torch.cat([weight.double(), bias.double()[:, None]], 1)

    def objective(drop):  # E(W'_K) − E(W̃) for the ridge refit of the kept columns, written out
        keep = torch.tensor([c for c in range(13) if c not in drop])
        refit = torch.linalg.solve(hessian[keep][:, keep], rhs[:, keep].T).T
        full = torch.zeros_like(augmented)
        full[:, keep] = refit
        delta = full - augmented  # E(W) = tr(ΔW G̃ ΔWᵀ) + λ‖ΔW‖² with G̃ + λI = hessian
        return torch.trace(delta @ hessian @ delta.T).item()

    dropped, units, total = [], [], objective([])
    for _ in range(4):
        costs = system.costs(len(group.units))
        costs[torch.tensor(units, dtype=torch.long)] = np.inf
        unit = int(torch.argmin(costs))
        system.remove(unit)
        units.append(unit)
        dropped.append(int(group.units[unit].elements[stage[0].space][0]))
        assert objective(dropped) == pytest.approx(total + costs[unit].item(), rel=1e-6, abs=1e-9)
        total += costs[unit].item()


def test_paired_statistics_cross_gram():
    """``reference=``: X̂ᵀX between the graph's inputs and the reference graph's, on the same batches."""
    model = mlp3()
    batches = [torch.randn(32, 16) for _ in range(3)]
    reference = capture(model, (batches[0],))
    changed = copy.deepcopy(reference)
    with torch.no_grad():
        ir.get_attr(changed, "0.weight").mul_(0.5)
    nodes = [n for n in changed.graph.nodes if n.op == "call_function" and n.target in LAYER_OPS]
    stats = collect_statistics(changed, batches, nodes[1:], reference=reference, progress=False)
    x = torch.cat(batches)
    hidden = (torch.relu(model[0](x)), torch.relu(0.5 * x @ model[0].weight.T + model[0].bias))
    s = stats[nodes[1].name]
    torch.testing.assert_close(s.cross.float(), hidden[1].T @ hidden[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(s.reference_feature_sum.float(), hidden[0].sum(0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(s.gram.float(), hidden[1].T @ hidden[1], rtol=1e-4, atol=1e-3)


def test_padding_tokens_are_not_counted():
    torch.manual_seed(0)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc = nn.Embedding(10, 6), nn.Linear(6, 4)

        def forward(self, input_ids, attention_mask):
            return self.fc(self.embed(input_ids)) * attention_mask[..., None]

    ids, mask = torch.randint(0, 10, (3, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    model = Tokens().eval()
    gm = capture(model, {"input_ids": ids, "attention_mask": mask})
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    s = collect_statistics(gm, [{"input_ids": ids, "attention_mask": mask}], [node], progress=False)[node.name]
    rows = model.embed(ids)[mask.bool()].double()
    assert s.rows == s.positions == int(mask.sum())
    torch.testing.assert_close(s.gram, rows.T @ rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.channel_absmax, rows.abs().amax(0), rtol=1e-6, atol=1e-6)


def test_bad_sequential_options():
    with pytest.raises(PassConfigError, match="compensate='lstsq'"):
        PruneChannels(ratio=0.3, importance="reconstruction", compensate="bias")
    with pytest.raises(PassConfigError, match="sequential"):
        PruneChannels(ratio=0.3, sequential=True)
