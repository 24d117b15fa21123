"""Decode and prefill engines chosen apart: ``Int8`` times each linear at one row and at the example's rows,
and a layer whose choices differ runs ``fxcompress::int8_linear_by_rows`` (graph, applied module, saved file)."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress import apply_to_model, tuning
from fxcompress.errors import FxCompressWarning, PassConfigError
from fxcompress.layers import Int8Linear
from fxcompress.ops.int8_linear import quantize_weight_per_channel
from fxcompress.passes import Int8
from fxcompress.passes._int8_lowering import _INPUT, FloatGroup, GemmProblem, cold_weight_calls, gemm_weight_copies, tensor_bytes
from tests import llm_zoo

DYNAMIC = "int8_linear_dynamic"
BY_ROWS = torch.ops.fxcompress.int8_linear_by_rows.default
INT_MM = torch.ops.fxcompress.int8_linear.default
SLEEP_S = 0.01  # far above load noise: a 3 ms sleep lost to the spread on the shared machine


def _rows(problem) -> int:
    return problem.x.numel() // problem.x.shape[-1]


def _slow_unless(candidate: tuning.Candidate, fast_at_one_row: bool) -> tuning.Candidate:
    """``candidate`` with a 10 ms sleep except at one row (``fast_at_one_row``) or except above one row."""
    def run(problem):
        if (_rows(problem) == 1) != fast_at_one_row:
            time.sleep(SLEEP_S)
        return candidate.run(problem)

    return replace(candidate, run=run)


@pytest.fixture
def decode_winner(monkeypatch, tmp_path):
    """The dynamic family reduced to float and int_mm, ``winner`` of the two fast only at one row, the other only above."""
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path))
    family = tuning.family(DYNAMIC)

    def install(winner: str):
        candidates = {n: _slow_unless(family.candidates[n], fast_at_one_row=n == winner) for n in ("float", "int_mm")}
        monkeypatch.setitem(tuning._FAMILIES, DYNAMIC, tuning.Family(DYNAMIC, candidates, family.static_rule))

    return install


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval(), (torch.randn(2, 24, 64),)


def _optimize(model, inputs, **options):
    return fxcompress.optimize(model, inputs, passes=[Int8(min_weight_numel=0, tune_time_s=0.01, **options)], report=False)


def _reference(model, inputs, impl: str):
    """The same int8 weights through one engine at every row count (``impl`` forced, no row buckets)."""
    mode = "weight_only" if impl == "int8_weight_only" else "dynamic"
    return _optimize(model, inputs, mode=mode, impl=impl, decode_rows=None)


DECODE, PREFILL = torch.randn(1, 1, 64), torch.randn(3, 20, 64)


@pytest.mark.parametrize("winner, engines", [("int_mm", ("int_mm", "dequantize")), ("float", ("float", "int_mm"))])
def test_decode_engine_is_chosen_at_one_row_and_runs_there(decode_winner, winner, engines):
    decode_winner(winner)
    model, inputs = _mlp()
    gm = _optimize(model, inputs)
    nodes = [n for n in gm.graph.nodes if n.target is BY_ROWS]
    assert len(nodes) == 2 and all(tuple(n.args[6:]) == (*engines, 16) for n in nodes)
    assert all((n.args[4] is not None) == (engines[0] == "float") for n in nodes), "the float weight is kept only for a float bucket"
    details = gm.report.results["int8"].details
    assert {(d["decode_impl"], d["impl"]) for d in details} == {engines}
    for d in details:
        assert d["decode_chosen_by"].startswith("measured fastest") and d["chosen_by"].startswith("measured fastest")
        slow_at_decode = "float" if winner == "int_mm" else "int_mm"
        assert float(d["decode_timings"].split(f"{slow_at_decode} ")[1].split("±")[0]) >= 1e3 * SLEEP_S
        assert d["row_dispatch"].startswith(f"int8_linear_by_rows: {engines[0]} at <= 16 rows, {engines[1]} above")
    decode_reference = model if engines[0] == "float" else _reference(model, inputs, "int_mm")
    prefill_reference = _reference(model, inputs, "int8_weight_only" if engines[1] == "dequantize" else "int_mm")
    with torch.no_grad():
        torch.testing.assert_close(gm(DECODE), decode_reference(DECODE), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gm(PREFILL), prefill_reference(PREFILL), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(gm(DECODE), prefill_reference(DECODE), rtol=1e-6, atol=1e-6), "the buckets differ"


def test_a_tie_at_one_row_keeps_the_int8_engine_and_no_float_weight(monkeypatch, tmp_path):
    """int_mm wins above one row; at one row float is faster by less than the spread: a float copy of the
    weight would buy nothing measurable, so the int8 engine runs at every row count."""
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path))
    family, rows_seen = tuning.family(DYNAMIC), []
    timings = {("float", True): tuning.Timing(1.0, 0.2, 0.9), ("int_mm", True): tuning.Timing(1.05, 0.2, 0.95),
               ("float", False): tuning.Timing(10.0, 0.2, 9.9), ("int_mm", False): tuning.Timing(1.0, 0.2, 0.9)}

    def recording(candidate):
        return replace(candidate, run=lambda problem: (rows_seen.append(_rows(problem)), candidate.run(problem))[1])

    def measured(fns, device, min_run_time):
        return {name: (fn(), timings[name, rows_seen[-1] == 1])[1] for name, fn in fns.items()}

    candidates = {n: recording(family.candidates[n]) for n in ("float", "int_mm")}
    monkeypatch.setitem(tuning._FAMILIES, DYNAMIC, tuning.Family(DYNAMIC, candidates, family.static_rule))
    monkeypatch.setattr(tuning, "compare", measured)
    model, inputs = _mlp()
    gm = _optimize(model, inputs)
    assert not any(n.target is BY_ROWS for n in gm.graph.nodes)
    assert {(d["decode_impl"], d["impl"]) for d in gm.report.results["int8"].details} == {("int_mm", "int_mm")}
    assert all(d["decode_chosen_by"].startswith("no measurable gain over int_mm") for d in gm.report.results["int8"].details)


def test_decode_timings_cycle_through_cold_copies_of_the_weights():
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(1, 64)
    float_group = FloatGroup(((torch.ops.aten.linear.default, [_INPUT, weight, bias], {}),), lambda y: y)
    weight_q, scale = quantize_weight_per_channel(weight)
    problem = GemmProblem(torch.device("cpu"), x, (weight_q, scale, bias, "none"), float_group.at(x))
    read = []

    def run(problem):
        read.append(problem.op_args[0].data_ptr())
        return torch.ops.fxcompress.int8_linear(problem.x, *problem.op_args)

    timed = cold_weight_calls(problem, gemm_weight_copies(problem, float_group), working_set=10 * tensor_bytes(problem.op_args))
    engine_call = timed(tuning.Candidate("int_mm", run))
    read.clear()
    outputs = [engine_call() for _ in range(20)]
    assert len(set(read)) == 10 and read[:10] == read[10:], "ten copies, read in turn"
    assert all(torch.equal(o, outputs[0]) for o in outputs)
    float_call = timed(tuning.Candidate("float", lambda p: p.float_run()))
    reference = torch.nn.functional.linear(x, weight, bias)
    assert all(torch.equal(float_call()[0], reference) for _ in range(5))
    assert math.ceil(10 * tensor_bytes(problem.op_args) / tensor_bytes([weight, bias])) == 3  # fp32: fewer, larger copies


def test_same_choice_at_both_row_counts_is_one_plain_op(decode_winner):
    decode_winner("int_mm")
    model, inputs = _mlp()
    gm = _optimize(model, inputs, impl="int_mm")
    assert not any(n.target is BY_ROWS for n in gm.graph.nodes)
    assert sum(n.target is INT_MM for n in gm.graph.nodes) == 2
    assert {(d["decode_impl"], d["impl"]) for d in gm.report.results["int8"].details} == {("int_mm", "int_mm")}


def test_decode_rows_option_is_validated_and_none_times_one_row_count(decode_winner):
    with pytest.raises(PassConfigError, match="decode_rows must be an integer >= 1 or None"):
        Int8(decode_rows=0)
    decode_winner("int_mm")
    model, inputs = _mlp()
    gm = _optimize(model, inputs, decode_rows=None)
    assert not any(n.target is BY_ROWS for n in gm.graph.nodes)
    assert all("decode_impl" not in d for d in gm.report.results["int8"].details)


def test_by_rows_graph_saves_loads_and_keeps_dynamic_rows(decode_winner, tmp_path):
    decode_winner("int_mm")
    model, inputs = _mlp()
    gm = _optimize(model, inputs)
    fxcompress.save(gm, tmp_path / "m.pt2")
    loaded = fxcompress.load(tmp_path / "m.pt2")
    assert sum(n.target is BY_ROWS for n in loaded.graph.nodes) == 2
    with torch.no_grad():
        for x in (DECODE, PREFILL, torch.randn(4, 4, 64)):  # 1, 60 and 16 rows: both buckets and the boundary
            torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


@pytest.mark.slow  # ~15 s on 2 cores: captures a tiny Llama and times its 9 GEMM groups at two row counts
def test_applied_llm_dispatches_by_rows_generates_and_reloads(decode_winner, tmp_path):
    decode_winner("int_mm")
    model, inputs = llm_zoo.build("llama"), llm_zoo.tokens(batch=2, length=12)
    gm = _optimize(model, inputs)
    assert any(n.target is BY_ROWS for n in gm.graph.nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        module = apply_to_model(gm, model)
    layers = [m for m in module.modules() if isinstance(m, Int8Linear) and m.by_rows]
    assert layers and all(m.by_rows == ("int_mm", "dequantize", 16) and m.float_weight is None for m in layers)
    short = llm_zoo.tokens(batch=1, length=5, seed=3)
    with torch.no_grad():
        for batch in (inputs, short):
            torch.testing.assert_close(module(**batch).logits, gm(**batch).logits, rtol=1e-5, atol=1e-5)
        prompt = inputs["input_ids"][:1, :4]
        out = module.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        for step, step_logits in enumerate(out.logits):  # one-row steps run the decode engine, as the graph on ≤16 rows
            prefix = out.sequences[:, : prompt.shape[1] + step]
            torch.testing.assert_close(step_logits, gm(input_ids=prefix).logits[:, -1], rtol=1e-4, atol=1e-4)
    module.save_pretrained(tmp_path)
    reloaded = fxcompress.load_pretrained(type(model), tmp_path)
    assert [m.by_rows for m in reloaded.modules() if isinstance(m, Int8Linear)] == [m.by_rows for m in module.modules() if isinstance(m, Int8Linear)]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, gm(**inputs).logits, rtol=1e-5, atol=1e-5)
