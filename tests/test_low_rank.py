"""Tests of the ``low_rank`` pass: factorization math, rank selection, graph rewrites on HF BERT and CNNs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.capture import capture
from fxcompress.errors import PassConfigError
from fxcompress.manager import PassManager, apply_pass
from fxcompress.models import BasicBlock
from fxcompress.pass_base import PassContext
from fxcompress.passes import _rank_selection as rs
from fxcompress.passes._factorizations import factorize, reconstruct, run_stages
from fxcompress.passes.low_rank import LowRank
from fxcompress.report import count_flops


def with_spectrum(out_features: int, in_features: int, singular_values: list[float], seed: int = 0) -> torch.Tensor:
    """A weight U diag(s) Vᵀ with random orthonormal U, V: its singular values are exactly ``s``."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=gen, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def captured(model: nn.Module, *args, **kwargs):
    model.eval()
    return capture(model, (args if args else kwargs)), PassContext(args, kwargs)


def run_pass(gm, ctx, **options):
    return apply_pass(LowRank(**options), gm, ctx)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- factorization at full rank is exact -------------------------------------------------------

FULL_RANK_CASES = [
    # kind, weight shape, op, input shape, (stride, padding, dilation)
    ("linear", (24, 40), F.linear, (3, 5, 40), None),
    ("pointwise", (24, 16, 1, 1), F.conv2d, (2, 16, 9, 9), ([2, 2], [1, 1], [1, 1])),
    ("tucker2", (24, 16, 3, 3), F.conv2d, (2, 16, 11, 11), ([2, 2], [1, 1], [2, 2])),
    ("tucker2", (12, 8, 5), F.conv1d, (2, 8, 20), ([2], [2], [1])),
    ("separable", (24, 16, 3, 5), F.conv2d, (2, 16, 11, 13), ([2, 1], [1, 2], [1, 2])),
]


@pytest.mark.parametrize("kind,shape,op,input_shape,geometry", FULL_RANK_CASES)
def test_full_rank_reproduces_layer(kind, shape, op, input_shape, geometry):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(shape), torch.randn(shape[0]), torch.randn(input_shape)
    out_ch, in_ch, kernel = shape[0], shape[1], math.prod(shape[2:])
    if kind == "tucker2":
        full = (min(in_ch, out_ch * kernel), min(out_ch, in_ch * kernel))
    elif kind == "separable":
        full = (min(in_ch * shape[2], out_ch * shape[3]),)
    else:
        full = (min(out_ch, in_ch),)
    stages = factorize(weight, kind, full, geometry)
    expected = op(x, weight, bias, *geometry) if geometry else op(x, weight, bias)
    assert max_rel_err(run_stages(x, stages, bias), expected) < 1e-5
    assert max_rel_err(reconstruct(kind, stages), weight) < 1e-5
    truncated = factorize(weight, kind, tuple(max(1, r // 2) for r in full), geometry)
    assert max_rel_err(reconstruct(kind, truncated), weight) > 1e-2


# --- rank selection ----------------------------------------------------------------------------


def test_energy_rank_on_synthetic_spectrum():
    # squared spectrum 16, 9, 4, 1 (total 30): the first r values hold 16/30, 25/30, 29/30, 30/30
    spectrum = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [rs.rank_for_energy(spectrum, e) for e in (0.5, 0.54, 0.8, 0.84, 0.9, 0.97, 1.0)] == [1, 2, 2, 3, 3, 4, 4]
    assert rs.discarded_energy(spectrum, 2) == pytest.approx(5 / 30)


def test_energy_selection_in_the_pass():
    model = nn.Linear(32, 32)
    model.weight.data = with_spectrum(32, 32, [4.0, 3.0, 2.0, 1.0]).float()
    gm, ctx = captured(model, torch.randn(6, 32))
    result = run_pass(gm, ctx, energy=0.8)
    assert [row["rank"] for row in result.details] == [2]
    assert result.details[0]["rel_error"] == pytest.approx(math.sqrt(5 / 30), rel=1e-4)


def test_rank_spec_and_rounding():
    assert rs.rank_from_spec(0.25, 768) == 192
    assert rs.rank_from_spec(0.3, 64) == 20
    assert rs.rank_from_spec(100, 64) == 64
    assert rs.round_rank(20, 8, 64) == 24
    assert rs.round_rank(63, 8, 64) == 64
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    gm, ctx = captured(model, torch.randn(4, 64))
    result = run_pass(gm, ctx, rank=0.3, round_to=8)
    assert [row["rank"] for row in result.details] == [24, 24]


def test_known_rank_matrix_recovered_exactly():
    model = nn.Linear(64, 48)
    model.weight.data = with_spectrum(48, 64, [5.0, 4.0, 3.0, 2.0, 1.0]).float()
    x = torch.randn(7, 64)
    reference = model(x)
    gm, ctx = captured(model, x)
    result = run_pass(gm, ctx, rank=5)
    assert result.changed and result.rewritten == ["weight"]  # a top-level layer is named by its weight
    (row,) = result.details
    assert (row["full_rank"], row["rank"]) == (48, 5)
    assert (row["macs_before"], row["macs_after"]) == (7 * 64 * 48, 7 * 5 * (64 + 48))
    assert row["rel_error"] < 1e-5
    assert max_rel_err(gm(x), reference) < 1e-5
    other_batch = torch.randn(3, 64)
    assert max_rel_err(gm(other_batch), model(other_batch)) < 1e-5


def test_more_expensive_factorization_is_left_alone():
    gm, ctx = captured(nn.Linear(16, 16), torch.randn(2, 16))
    code = gm.code
    result = run_pass(gm, ctx, rank=12)
    assert not result.changed and not result.details and gm.code == code
    ((target, reason),) = result.skipped
    assert "MACs" in reason and "12" in reason


def test_target_macs_spends_budget_on_the_compressible_layer():
    decaying, flat = nn.Linear(128, 128, bias=False), nn.Linear(128, 128, bias=False)
    decaying.weight.data = with_spectrum(128, 128, [0.7**i for i in range(128)], seed=1).float()
    flat.weight.data = with_spectrum(128, 128, [1.0] * 128, seed=2).float()
    model = nn.Sequential(decaying, flat)
    gm, ctx = captured(model, torch.randn(16, 128))
    before = count_flops(gm, ctx)
    result = run_pass(gm, ctx, target_macs=0.6)
    after = count_flops(gm, ctx)
    assert after <= 0.6 * before
    ranks = {row["layer"]: row["rank"] for row in result.details}
    assert ranks["0"] < ranks.get("1", 128)
    assert (before - after) // 2 == sum(row["macs_before"] - row["macs_after"] for row in result.details)


def test_min_speedup_skips_layers_not_measured_faster():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    gm, ctx = captured(model, torch.randn(32, 256))
    code = gm.code
    result = run_pass(gm, ctx, rank=0.25, min_speedup=1000.0)
    assert not result.changed and gm.code == code
    assert len(result.skipped) == 2 and all("measured speedup" in reason for _, reason in result.skipped)
    gm, ctx = captured(model, torch.randn(32, 256))
    result = run_pass(gm, ctx, rank=0.25, min_speedup=1e-3)
    assert len(result.rewritten) == 2 and all(row["speedup"] > 1e-3 for row in result.details)


def test_shared_weight_is_left_alone():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)

        def forward(self, x):
            return self.proj(self.proj(x))

    gm, ctx = captured(Twice(), torch.randn(2, 64))
    result = run_pass(gm, ctx, rank=4)
    assert not result.changed
    assert all("used 2 times" in reason for _, reason in result.skipped)


# --- whole models ------------------------------------------------------------------------------


def small_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_bert_attention_and_mlp_linears_are_decomposed():
    model = small_bert()
    ids = torch.randint(0, 200, (2, 16))
    gm, ctx = captured(model, input_ids=ids)
    before = count_flops(gm, ctx)
    (record,) = PassManager([LowRank(rank=0.25)]).run(gm, ctx)
    result = record.result
    names = set(result.rewritten)
    for layer in range(2):
        prefix = f"encoder.layer.{layer}"
        expected = {f"{prefix}.attention.self.{p}" for p in ("query", "key", "value")} | {
            f"{prefix}.attention.output.dense", f"{prefix}.intermediate.dense", f"{prefix}.output.dense"
        }
        assert expected <= names
    out = gm(input_ids=torch.randint(0, 200, (3, 16)))
    assert out.last_hidden_state.shape == (3, 16, 64)
    assert (before - count_flops(gm, ctx)) // 2 == sum(r["macs_before"] - r["macs_after"] for r in result.details)
    for row in result.details:
        assert row["rank"] == 16 and 0 < row["rel_error"] < 1
    assert not any(n.target == torch.ops.aten.linear.default and "val" not in n.meta for n in gm.graph.nodes)


def test_bert_include_selects_mlp_only():
    model = small_bert()
    gm, ctx = captured(model, input_ids=torch.randint(0, 200, (2, 16)))
    mlp = ("encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense")
    result = run_pass(gm, ctx, rank=0.25, include=mlp, ignore=("encoder.layer.1.**",))
    assert sorted(result.rewritten) == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    reasons = dict(result.skipped)
    assert "include" in reasons["encoder.layer.0.attention.self.query"]
    assert "ignore" in reasons["encoder.layer.1.output.dense"]


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.layer1 = BasicBlock(32, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.depthwise(self.layer2(self.layer1(F.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method,rank", [("tucker2", 0.5), ("separable", 0.25)])
def test_cnn_is_decomposed_and_keeps_shapes(method, rank):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    gm, ctx = captured(SmallResNet(), x)
    before = count_flops(gm, ctx)
    (record,) = PassManager([LowRank(rank=rank, method=method)]).run(gm, ctx)
    result = record.result
    assert {"layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"} <= set(result.rewritten)
    assert "grouped" in dict(result.skipped)["depthwise"]
    assert {row["kind"] for row in result.details} >= {method}
    assert gm(torch.randn(5, 3, 16, 16)).shape == (5, 10)
    assert (before - count_flops(gm, ctx)) // 2 == sum(r["macs_before"] - r["macs_after"] for r in result.details)


def test_cnn_tucker_energy_error_is_bounded_by_discarded_energy():
    torch.manual_seed(0)
    gm, ctx = captured(SmallResNet(), torch.randn(1, 3, 16, 16))
    result = run_pass(gm, ctx, energy=0.9)
    tucker = [row for row in result.details if row["kind"] == "tucker2"]
    assert tucker
    for row in tucker:
        # HOSVD: ||W - Ŵ||² <= discarded energy of both modes, each <= 1 - 0.9
        assert row["rel_error"] <= math.sqrt(2 * 0.1) + 1e-6


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rank": 4, "energy": 0.9},
        {"rank": 0},
        {"rank": 1.5},
        {"rank": True},
        {"rank": "4"},
        {"energy": 0.0},
        {"energy": 1.2},
        {"target_macs": 1.0},
        {"rank": 4, "method": "cp"},
        {"rank": 4, "round_to": 0},
        {"rank": 4, "min_speedup": 0},
        {"rank": 4, "include": [1]},
    ],
)
def test_bad_options_raise(options):
    with pytest.raises(PassConfigError, match="low_rank"):
        LowRank(**options)


def test_include_string_is_accepted_as_one_pattern():
    assert LowRank(rank=4, include="encoder.*").include == ("encoder.*",)


def test_registered_and_configured_by_name():
    from fxcompress.registry import make_pass

    low_rank = make_pass("low_rank", energy=0.9, round_to=8, include=["encoder.**"])
    assert isinstance(low_rank, LowRank) and low_rank.include == ("encoder.**",)
    assert low_rank.config() == {
        "pass": "low_rank", "rank": None, "energy": 0.9, "target_macs": None, "method": "tucker2",
        "round_to": 8, "min_speedup": None, "include": ("encoder.**",), "ignore": (), "whiten": None, "refit": None,
        "budget_error": "layer", "whiten_output": False, "layer_ranks": (),
    }
    with pytest.raises(PassConfigError):
        make_pass("low_rank", energy=0.9, ranks=4)


def test_optimize_pipeline_reports_per_layer_details():
    import fxcompress

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    gm = fxcompress.optimize(
        SmallResNet().eval(), (x,), passes=["fold_bn", LowRank(rank=0.5)], report=fxcompress.ReportConfig(latency=False)
    )
    result = gm.report.results["low_rank"]
    assert result.details and set(result.details[0]) >= {
        "layer", "kind", "full_rank", "rank", "macs_before", "macs_after", "rel_error"
    }
    assert gm.report.rows[-1]["macs"] < gm.report.rows[0]["macs"]
    assert gm(x).shape == (2, 10)
