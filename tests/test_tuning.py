"""Never slower: measured lowering choices, the per-machine cache, the static table, the end-to-end guard."""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, replace

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxcompress
from fxcompress import tuning
from fxcompress.ops import qengine
from fxcompress.pass_base import Pass, PassResult
from fxcompress.passes.int8 import Int8
from fxcompress.ops.int8_linear import quantize_weight_per_channel
from fxcompress.report import ReportConfig, latency_guard
from fxcompress.verify import fidelity

DYNAMIC = "int8_linear_dynamic"
QUICK = ReportConfig(min_run_time=0.05, repeats=5)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval(), (torch.randn(16, 64),)


def _int8(**options):
    return Int8(min_weight_numel=0, tune_time_s=0.01, **options)


def _slowed(candidate: tuning.Candidate, seconds: float = 0.01) -> tuning.Candidate:
    def run(problem):
        time.sleep(seconds)
        return candidate.run(problem)

    return replace(candidate, run=run)


@pytest.fixture
def only_float_and_int_mm(monkeypatch):
    """The dynamic family reduced to two candidates; the test slows one of them down."""
    family = tuning.family(DYNAMIC)

    def install(slow: str):
        candidates = {n: family.candidates[n] for n in ("float", "int_mm")}
        candidates[slow] = _slowed(candidates[slow])
        monkeypatch.setitem(tuning._FAMILIES, DYNAMIC, tuning.Family(DYNAMIC, candidates, family.static_rule))

    return install


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("slow, chosen", [("float", "int_mm"), ("int_mm", "float")])
def test_slow_candidate_loses_and_timings_are_listed(only_float_and_int_mm, cache_dir, slow, chosen):
    only_float_and_int_mm(slow)
    model, inputs = _mlp()
    gm = fxcompress.optimize(model, inputs, passes=[_int8()], report=False)
    details = gm.report.results["int8"].details
    assert {d["impl"] for d in details} == {chosen}
    for d in details:
        assert d["chosen_by"].startswith("measured fastest") and "float" in d["timings"] and "int_mm" in d["timings"]
        assert float(d["timings"].split(f"{slow} ")[1].split("±")[0]) >= 10.0  # the 10 ms sleep
    int8_nodes = [n for n in gm.graph.nodes if n.target is torch.ops.fxcompress.int8_linear.default]
    assert len(int8_nodes) == (2 if chosen == "int_mm" else 0)
    if chosen == "float":
        assert all(reason.startswith("kept float: measured fastest") for _, reason in gm.report.results["int8"].skipped)


@pytest.mark.parametrize("flags, impl", [
    (("avx2", "avx512f", "avx512_vnni"), "int_mm"),
    (("avx2", "amx_tile", "amx_int8"), "int_mm"),
    (("avx2",), "qengine:fbgemm"),
])
def test_static_table_follows_cpu_features(monkeypatch, flags, impl):
    monkeypatch.setattr(tuning, "cpu_description", lambda: ("Test CPU", flags))
    monkeypatch.setattr(tuning, "compare", lambda *a, **k: pytest.fail("tune=False must not time anything"))
    model, inputs = _mlp()
    gm = fxcompress.optimize(model, inputs, passes=[_int8(tune=False)], report=False)
    details = gm.report.results["int8"].details
    assert {d["impl"] for d in details} == {impl}
    assert all(d["chosen_by"] == "static rule for Test CPU [" + " ".join(flags) + "] " f"{torch.get_num_threads()} threads (tune=False)"
               for d in details)
    assert fidelity(model(*inputs), gm(*inputs)).cosine > 0.999


def test_isa_caps_to_avx2_make_an_avx2_cpu_with_its_own_cache_key(monkeypatch):
    for name in tuning.ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    uncapped_flags, uncapped_key = tuning.cpu_description()[1], tuning.machine_key(torch.device("cpu"))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert tuning.cpu_description()[1] == tuple(f for f in uncapped_flags if f == "avx2")
    capped_key = tuning.machine_key(torch.device("cpu"))
    assert capped_key != uncapped_key and "ONEDNN_MAX_CPU_ISA=AVX2" in capped_key
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # not every library capped at AVX2: the flags as read
    assert tuning.cpu_description()[1] == uncapped_flags


def test_cache_hit_then_invalidated_by_torch_version_and_device(cache_dir, monkeypatch):
    calls = []
    real_compare = tuning.compare
    monkeypatch.setattr(tuning, "compare", lambda *a, **k: calls.append(1) or real_compare(*a, **k))
    model, inputs = _mlp()

    def timed_calls() -> int:
        calls.clear()
        gm = fxcompress.optimize(model, inputs, passes=[_int8()], report=False)
        return len(calls), gm.report.results["int8"].details

    first, _ = timed_calls()
    assert first == 2 and (cache_dir / "kernel_timings.json").exists()  # two linears of different shapes
    second, details = timed_calls()
    assert second == 0 and all(d["chosen_by"].endswith("(cached)") for d in details)
    monkeypatch.setattr(torch, "__version__", "99.0.0")
    assert timed_calls()[0] == 2
    monkeypatch.setattr(tuning, "machine_key", lambda device: "another CPU")
    assert timed_calls()[0] == 2
    assert timed_calls()[0] == 0


def test_fidelity_contract_rejects_an_inaccurate_candidate(monkeypatch, cache_dir):
    family = tuning.family(DYNAMIC)
    wrong = replace(family.candidates["qengine:x86"], run=lambda problem: torch.zeros_like(family.candidates["int_mm"].run(problem)))
    candidates = {"float": _slowed(family.candidates["float"]), "int_mm": family.candidates["int_mm"], "qengine:x86": wrong}
    monkeypatch.setitem(tuning._FAMILIES, DYNAMIC, tuning.Family(DYNAMIC, candidates, family.static_rule))
    model, inputs = _mlp()
    details = fxcompress.optimize(model, inputs, passes=[_int8()], report=False).report.results["int8"].details
    assert {d["impl"] for d in details} == {"int_mm"}
    assert all(d["rejected"].startswith("qengine:x86: output error 1 >") for d in details)


def test_qengine_op_export_save_load_compile_and_other_batch(tmp_path):
    model, inputs = _mlp()
    gm = fxcompress.optimize(model, inputs, passes=[_int8(impl="qengine:fbgemm")], report=False)
    op = torch.ops.fxcompress.int8_linear_qengine.default
    assert sum(n.target is op for n in gm.graph.nodes) == 2
    fxcompress.save(gm, tmp_path / "q.pt2")
    loaded = fxcompress.load(tmp_path / "q.pt2")
    assert sum(n.target is op for n in loaded.graph.nodes) == 2
    other = torch.randn(3, 64)
    torch.testing.assert_close(loaded(other), gm(other))
    assert fidelity(model(other), loaded(other)).cosine > 0.999
    compiled = torch.compile(loaded, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(other), gm(other))


@pytest.mark.parametrize("engine", [e for e in qengine.QUANTIZED_ENGINES if qengine.engine_available(e)])
def test_quantized_engines_are_accurate_cached_and_thread_safe(engine):
    x, w, b = torch.randn(33, 96), torch.randn(80, 96), torch.randn(80)
    w_q, w_scale = quantize_weight_per_channel(w)
    op = torch.ops.fxcompress.int8_linear_qengine
    results = [None] * 4

    def worker(i):
        results[i] = op(x, w_q, w_scale, b, "gelu", engine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, results[0]) for r in results)
    reference = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    assert fidelity(reference, results[0]).cosine > 0.999
    packs = len(qengine.prepacked)
    op(x, w_q, w_scale, b, "gelu", engine)
    assert len(qengine.prepacked) == packs  # reused, not repacked
    w_q.mul_(-1)  # in-place change: the version counter invalidates the packed weight
    assert fidelity(-torch.nn.functional.linear(x, w, None) + b, op(x, w_q, w_scale, b, "none", engine)).cosine > 0.999


def _sleepy_identity(x):
    time.sleep(0.01)
    return x


@dataclass(frozen=True)
class _InsertSleep(Pass):
    """A lossless test pass that makes the model slower: an identity that sleeps 10 ms on the output."""

    name = "insert_sleep"
    lossless = True

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        value = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
        with gm.graph.inserting_before(output):
            slow = gm.graph.call_function(_sleepy_identity, (value,))
        output.replace_input_with(value, slow)
        return PassResult(changed=True, rewritten=["output"])


class _WastefulModel(nn.Module):
    """``fc(x) + 0 · big(x)``: the zero-weighted branch is pure waste that a pass can remove."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.big = nn.Sequential(nn.Linear(64, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 64))
        self.register_buffer("zero", torch.zeros(()))

    def forward(self, x):
        return self.fc(x) + self.zero * self.big(x)


@dataclass(frozen=True)
class _DropZeroBranch(Pass):
    """A lossless test pass that makes the model faster: ``a + 0 · b -> a``."""

    name = "drop_zero_branch"
    lossless = True

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.add.Tensor and getattr(node.args[1], "target", None) is torch.ops.aten.mul.Tensor:
                node.replace_all_uses_with(node.args[0])
                gm.graph.eliminate_dead_code()
                return PassResult(changed=True, rewritten=["zero branch"])
        return PassResult(changed=False)


def test_guard_warns_once_naming_the_pass_that_made_it_slower():
    model, inputs = _mlp()
    with pytest.warns(RuntimeWarning) as warned:
        gm = fxcompress.optimize(model, inputs, passes=["fold_bn", _InsertSleep()], report=QUICK)
    caught = [w for w in warned if str(w.message).startswith("fxcompress:")]
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "slower than the input" in str(caught[0].message) and "slower after: insert_sleep" in str(caught[0].message)
    assert gm.report.latency_verdict == str(caught[0].message) and gm.report.rows[-1]["speedup"] < 0.5


def test_guard_stays_quiet_when_faster():
    torch.manual_seed(0)
    model, inputs = _WastefulModel().eval(), (torch.randn(64, 64),)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gm = fxcompress.optimize(model, inputs, passes=[_DropZeroBranch()], report=QUICK)
    assert gm.report.rows[-1]["speedup"] > 1.5
    assert gm.report.latency_verdict.startswith("end to end:")
    assert "machine: " in str(gm.report) and "threads" in gm.report.machine


def test_guard_reports_but_accepts_passes_asked_for_size():
    report = fxcompress.Report(rows=[
        {"stage": "input", "latency_ms": 1.0, "latency_iqr_ms": 0.01, "input_latency_ms": 1.0, "speedup": "no measurable change"},
        {"stage": "int8", "latency_ms": 2.0, "latency_iqr_ms": 0.01, "input_latency_ms": 1.0, "speedup": 0.5},
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert latency_guard(report, size_only=("int8",)) == ""
    assert "slower after: int8" in report.latency_verdict and "accepted" in report.latency_verdict
    with pytest.warns(RuntimeWarning, match="slower after: int8"):
        latency_guard(report)


def test_noise_larger_than_the_difference_is_no_measurable_change():
    same = tuning.compare({"a": lambda: torch.ones(8).sum(), "b": lambda: torch.ones(8).sum()}, min_run_time=0.02, rounds=5)
    assert set(same) == {"a", "b"} and all(0 < t.min_ms <= t.median_ms and t.iqr_ms >= 0 for t in same.values())
    noisy = tuning.Timing(1.0, 0.5, 0.8)
    assert not tuning.speedup_is_measurable(noisy, tuning.Timing(1.2, 0.1, 1.1))
    assert tuning.speedup_is_measurable(noisy, tuning.Timing(2.0, 0.1, 1.9))


def test_cli_no_tune_switches_int8_to_the_static_table():
    from fxcompress.cli import build_passes, parser

    fold_bn, int8 = build_passes("fold_bn,int8", ["int8.min_weight_numel=0"], tune=False)
    assert int8.tune is False and int8.min_weight_numel == 0 and not hasattr(fold_bn, "tune")
    assert build_passes("int8", [])[0].tune is True
    assert parser().parse_args(["optimize", "pkg.mod:factory", "--input-shape", "1,8", "--no-tune"]).no_tune


@pytest.mark.parametrize("int_mm_ms, chosen", [(0.8, "float"), (0.3, "int_mm")])
def test_a_gain_within_the_noise_keeps_the_float_original(monkeypatch, cache_dir, int_mm_ms, chosen):
    timings = {"float": tuning.Timing(1.0, 0.4, 0.9), "int_mm": tuning.Timing(int_mm_ms, 0.05, int_mm_ms)}
    monkeypatch.setattr(tuning, "compare", lambda fns, *a, **k: {n: timings[n] for n in fns})
    problem = type("Problem", (), {"device": torch.device("cpu")})()
    choice = tuning.choose(DYNAMIC, problem, ["float", "int_mm"], {"shape": [int_mm_ms]})
    assert choice.impl == chosen
    assert choice.reason.startswith("no measurable gain over float" if chosen == "float" else "measured fastest")
