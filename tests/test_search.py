"""optimize(target=...): the allocator's optimum, the known optimum on a synthetic model, replay, unreachable targets.

Costs are deterministic here: MACs are counted, and latency runs on a clock that reads FLOPs instead of
time (``flop_clock``), so the tests never depend on how loaded the machine is."""

from __future__ import annotations

import itertools
import json
import random
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import fxcompress
from fxcompress import tuning
from fxcompress.errors import FxCompressWarning, InvalidInputError
from fxcompress.passes import LowRank, PruneChannels
from fxcompress.report import count_flops
from fxcompress.search import Target, driver, load_pipeline, search
from fxcompress.search.allocate import Choice, Front
from fxcompress.search.cache import ANALYSES, CAPTURES
from fxcompress.search.cost_model import CostModel
from fxcompress.search.refine import neighbourhood, refine, saving_of
from fxcompress.search.result import Round
from fxcompress.pass_base import PassContext


class LowRankThenFullRank(nn.Module):
    """``a`` has an exactly rank-8 weight (factorizing it at rank >= 8 loses nothing); ``b`` is full rank."""

    def __init__(self, width: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(width, 8, generator=g) @ torch.randn(8, width, generator=g) / width)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def tiny_model() -> nn.Module:
    """For the CLI test (``test_search:tiny_model``)."""
    return LowRankThenFullRank(64).eval()


def flop_clock(fns):
    """A deterministic 'timer': a callable's cost is its FLOPs (in millions) plus a small constant per call."""
    timings = {}
    for name, fn in fns.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        cost = counter.get_total_flops() / 1e6 + 1e-3
        timings[name] = tuning.Timing(cost, 0.0, cost)
    return timings


@pytest.fixture(scope="module")
def synthetic():
    return LowRankThenFullRank().eval(), (torch.randn(32, 256, generator=torch.Generator().manual_seed(1)),)


def low_rank_layers(pipeline: list[dict]) -> dict[str, float]:
    return {name: rank for config in pipeline if config["pass"] == "low_rank" for name, rank in config["layer_ranks"]}


def brute_force(sites, required):
    best = None
    for picks in itertools.product(*[range(-1, len(s)) for s in sites]):
        chosen = [s[j] for s, j in zip(sites, picks) if j >= 0]
        if sum(c.saving for c in chosen) >= required and (best is None or sum(c.error for c in chosen) < best):
            best = sum(c.error for c in chosen)
    return best


def test_allocator_finds_the_least_error_allocation():
    rng = random.Random(0)
    for _ in range(100):
        sites = [[Choice(rng.uniform(0, 10), rng.uniform(0, 5)) for _ in range(rng.randint(1, 3))] for _ in range(4)]
        front = Front(sites, bins=4000)
        required = rng.uniform(0, 20)
        allocation = front.allocation(required)
        exact = brute_force(sites, required)
        # savings are rounded to bins, so the DP is exact up to a few bins of the requirement
        slack = brute_force(sites, required + len(sites) * front.step)
        if allocation is None:
            assert slack is None
            continue
        assert allocation.saving >= required
        assert exact is not None and allocation.error >= exact - 1e-9
        if slack is not None:
            assert allocation.error <= slack + 1e-9


def test_allocator_picks_cheap_errors_first_and_reports_the_front():
    sites = [[Choice(10.0, 1.0), Choice(20.0, 5.0)], [Choice(10.0, 0.1)], [Choice(30.0, 10.0)]]
    front = Front(sites)
    assert front.allocation(10.0).picks == (-1, 0, -1)
    assert front.allocation(20.0).picks == (0, 0, -1)
    assert front.allocation(25.0).picks == (1, 0, -1)
    assert front.allocation(71.0) is None
    errors = [e for _, e in front.points()]
    assert errors == sorted(errors) and errors[0] == 0.0
    assert front.cheapest_within(1.1).picks == (0, 0, -1)


def test_search_picks_the_known_optimum_for_a_macs_budget(synthetic):
    model, x = synthetic
    found = search(model, x, Target(macs=0.75, passes=("low_rank",), ranks=(0.25, 0.125)))
    chosen = found.chosen
    assert chosen.source == "search" and set(low_rank_layers(chosen.pipeline)) == {"a"}
    assert chosen.error < 1e-6 and chosen.macs <= 0.75
    baselines = [c for c in found.candidates if c.source == "baseline" and c.meets]
    assert baselines and all(c.error > 100 * max(chosen.error, 1e-9) for c in baselines)
    assert found.message == ""
    assert "*" in found.table() and "a rank" in str(found)


def test_latency_target_is_met_on_the_injected_clock_and_the_pipeline_replays(synthetic, tmp_path):
    model, x = synthetic
    found = search(model, x, Target(latency=0.7, passes=("low_rank", "prune_channels"), ranks=(0.25, 0.125)), clock=flop_clock)
    chosen = found.chosen
    assert chosen.meets and chosen.latency <= 0.7 * 1.05
    assert "a" in low_rank_layers(chosen.pipeline)

    found.save_pipeline(tmp_path / "pipeline.json")
    replayed = fxcompress.optimize(model, x, passes=load_pipeline(tmp_path / "pipeline.json"), report=False)
    direct = fxcompress.optimize(model, x, passes=found.pipeline, report=False)
    assert json.loads((tmp_path / "pipeline.json").read_text()) == json.loads(json.dumps(found.pipeline, default=str))
    assert torch.equal(replayed(*x), direct(*x))
    ctx = PassContext(x, {})
    assert count_flops(replayed, ctx) / count_flops(model, ctx) <= 0.7 * 1.05  # the FLOP clock's measure


def test_a_lucky_first_timing_is_confirmed_before_it_decides(synthetic):
    model, x = synthetic
    timed = set()

    def lucky_once(fns):  # each pipeline's first timing reads 10x fast (a quiet moment on a loaded machine)
        timings = flop_clock(fns)
        for name in [n for n in fns if n != "input" and n not in timed]:
            timed.add(name)
            timings[name] = tuning.Timing(timings[name].median_ms / 10, 0.0, timings[name].min_ms / 10)
        return timings

    ANALYSES.clear()
    found = search(model, x, Target(latency=0.4, passes=("low_rank",), ranks=(0.5, 0.25, 0.125)), clock=lucky_once)
    ANALYSES.clear()
    ctx = PassContext(x, {})
    chosen = fxcompress.optimize(model, x, passes=found.pipeline, report=False)
    assert found.chosen.meets and count_flops(chosen, ctx) / count_flops(model, ctx) <= 0.4 * 1.05
    assert found.chosen.latency == pytest.approx(count_flops(chosen, ctx) / count_flops(model, ctx), rel=0.05)


class LinearStack(nn.Module):
    """Four 128-wide linears; layer ``i`` has an exactly rank-``16 (i + 1)`` weight, so low rank's options
    are lossless on some layers and lossy on others, and their savings add up in 1/16ths of the model."""

    def __init__(self, width: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(4))
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                rank = 16 * (i + 1)
                layer.weight.copy_(torch.randn(width, rank, generator=g) @ torch.randn(rank, width, generator=g) / width)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class HalfPricedNewNodes(CostModel):
    """A cost model biased by a known factor: every node the base graph does not have (the factors a
    rewrite introduces) is predicted at half its measured time."""

    def calibrate(self, base, measured_ms):
        base_keys = set(base.keys)
        self.timings = {k: t if k in base_keys else t / 2 for k, t in self.timings.items()}
        super().calibrate(base, measured_ms)


def test_correction_rounds_meet_the_budget_a_biased_cost_model_misses(monkeypatch):
    model, x = LinearStack().eval(), (torch.randn(64, 128, generator=torch.Generator().manual_seed(3)),)
    target = Target(latency=0.6, passes=("low_rank",), ranks=(0.25, 0.125), baselines=False)
    ANALYSES.clear()
    monkeypatch.setattr(driver, "CostModel", HalfPricedNewNodes)
    found = search(model, x, target, clock=flop_clock)
    ANALYSES.clear()
    corrections = [r for r in found.rounds if r.anchor is None]
    first, last = corrections[0], corrections[-1]
    assert first.measured > 0.6 * 1.05 and first.measured > first.predicted * 1.1  # the bias shows in round 1
    assert len(found.rounds) >= 2 and last.aim < first.aim
    assert found.chosen.source == "search" and found.chosen.meets and found.chosen.latency <= 0.6 * 1.05
    assert found.message == "" and "correction rounds" in str(found)


def test_refinement_after_rounds_the_biased_model_misses_keeps_the_best_baseline_or_beats_it(monkeypatch):
    model, x = LinearStack().eval(), (torch.randn(64, 128, generator=torch.Generator().manual_seed(3)),)
    ANALYSES.clear()
    monkeypatch.setattr(driver, "CostModel", HalfPricedNewNodes)
    found = search(model, x, Target(latency=0.6, passes=("low_rank",), ranks=(0.375, 0.25, 0.125)), clock=flop_clock)
    ANALYSES.clear()
    refinements = [r for r in found.rounds if r.anchor is not None]
    assert refinements and all(r.aim == 0.6 for r in refinements) and "refine" in str(found)
    meeting_baselines = [c for c in found.candidates if c.source == "baseline" and c.meets]
    assert meeting_baselines and found.chosen.meets
    assert found.chosen.error <= min(c.error for c in meeting_baselines)


def test_refine_moves_each_site_one_step_and_gives_up_at_most_the_slack():
    cheap, dear, medium = ([Choice(float(s), e) for s, e in zip((1, 2, 3), errors)]
                           for errors in ((0.1, 0.2, 0.3), (1.0, 4.0, 9.0), (0.5, 1.0, 2.0)))
    sites, anchor = [cheap, dear, medium], (1, 1, 1)  # saves 6
    assert neighbourhood(cheap, 1, relax=True) == [0, 1] and neighbourhood(cheap, 1, relax=False) == [1, 2]
    assert neighbourhood(cheap, -1, relax=True) == [-1] and neighbourhood(cheap, 2, relax=False) == [2]
    assert refine(sites, anchor, slack=1.0) == (1, 0, 1)  # slack 1 buys one step down: the dearest error first
    assert refine(sites, anchor, slack=2.0) == (1, 0, 0)
    assert refine(sites, anchor, slack=-1.0) == (2, 1, 1)  # over budget: one step up where it costs least error
    assert refine(sites, anchor, slack=-4.0) is None  # one step up each saves 3 more at most
    assert saving_of(sites, (2, 0, -1)) == 4.0
    slower = [Choice(-1.0, 0.2), Choice(2.0, 0.5)]  # option 0 makes the site slower, yet it is the anchor's
    assert neighbourhood(slower, 0, relax=False) == [0, -1] and neighbourhood(slower, 0, relax=True) == [0]
    assert refine([slower, cheap], (0, 1), slack=-1.0) == (-1, 1)  # back to unchanged: saves 1, less error


def test_next_aim_interpolates_inside_a_bracket_and_never_aims_above_the_whole_model():
    over, under = Round(0.5, 0.5, 0.7, "over"), Round(0.36, 0.3, 0.45, "under")
    assert driver._next_aim([over, under], 0.5) == pytest.approx(0.3 + (0.05 / 0.25) * 0.2)
    assert driver._next_aim([Round(0.5, 0.5, 0.7, "over")], 0.5) == pytest.approx(0.5 * 0.5 / 0.7)
    assert driver._next_aim([Round(0.7, 0.8, 0.4, "far under")], 0.7) == 1.0


def test_several_targets_on_one_model_share_the_capture_and_the_analysis(monkeypatch):
    model, x = LowRankThenFullRank(64).eval(), (torch.randn(8, 64),)
    calls = {"capture": 0, "analyze": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    CAPTURES.clear()
    ANALYSES.clear()
    monkeypatch.setattr(driver, "capture", counted("capture", driver.capture))
    monkeypatch.setattr(driver, "analyze", counted("analyze", driver.analyze))
    results = [search(model, x, Target(macs=budget, passes=("low_rank",), ranks=(0.25, 0.125))) for budget in (0.9, 0.75, 0.6)]
    assert calls == {"capture": 1, "analyze": 1}
    assert [r.chosen.macs <= b for r, b in zip(results, (0.9, 0.75, 0.6))] == [True] * 3
    with torch.no_grad():
        model.a.weight.mul_(2)  # new weights: a new capture and analysis
    search(model, x, Target(macs=0.75, passes=("low_rank",), ranks=(0.25, 0.125)))
    assert calls == {"capture": 2, "analyze": 2}


def test_unreachable_target_returns_the_best_reachable_point_with_a_message(synthetic):
    model, x = synthetic
    with pytest.warns(FxCompressWarning, match="not reachable"):
        found = search(model, x, Target(macs=0.01, passes=("low_rank",), ranks=(0.25, 0.125)))
    assert "best reachable point" in found.message and "macs" in found.message
    measured = [c for c in found.candidates if c.source != "input"]
    assert found.chosen.macs == min(c.macs for c in measured)
    assert not found.chosen.meets


def test_optimize_with_target_returns_the_chosen_model_and_its_report(synthetic):
    model, x = synthetic
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxCompressWarning)
        gm = fxcompress.optimize(model, x, target=fxcompress.Target(macs=0.75, max_error=0.01, passes=("low_rank",)), report=False)
    assert gm.pipeline == gm.search.pipeline
    assert gm.report.rows[-1]["macs"] <= 0.75 * gm.report.rows[0]["macs"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(InvalidInputError, match="not both"):
        fxcompress.optimize(model, x, passes=["fold_bn"], target=Target(macs=0.5))


def test_target_rejects_bad_budgets():
    for bad in (dict(latency=0.5, size=0.5), dict(), dict(latency=1.5), dict(macs=0.5, passes=("quantize",)),
                dict(latency=0.5, ranks=(2,))):
        with pytest.raises(InvalidInputError):
            Target(**bad)


def test_per_layer_knobs_of_the_passes():
    model, x = LowRankThenFullRank(64).eval(), (torch.randn(8, 64),)
    factored = fxcompress.optimize(model, x, passes=[LowRank(layer_ranks={"b": 8})], report=False)
    assert [d["layer"] for d in factored.report.results["low_rank"].details] == ["b"]
    pruned = fxcompress.optimize(model, x, passes=[PruneChannels(group_ratios={"a.weight": 0.5})], report=False)
    groups = [d for d in pruned.report.results["prune_channels"].details[1:] if "group" in d]
    assert [(g["group"], g["kept_channels"]) for g in groups] == [("a.weight", 32)]
    replay = fxcompress.optimize(model, x, passes=json.loads(json.dumps(pruned.pipeline, default=str)), report=False)
    assert torch.equal(replay(*x), pruned(*x))


def test_cli_searches_for_a_target(tmp_path, capsys):
    from fxcompress.cli import main

    out = tmp_path / "pipeline.json"
    code = main(["optimize", "test_search:tiny_model", "--input-shape", "8,64", "--target", "macs=0.75",
                 "--search-passes", "low_rank", "--save-pipeline", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "target: macs<=0.75" in printed and "| stage" in printed
    assert low_rank_layers(json.loads(out.read_text())) == {"a": 0.25} or "a" in low_rank_layers(json.loads(out.read_text()))
