"""``optimize(target=Target(latency=...))`` against every single pass (and two-pass pipelines) at the same budget.

For each model (the ResNet-style CNN, the BERT-style encoder, the scikit-learn digits CNN with real
accuracy as the metric) and each latency target (0.7, 0.5, 0.35 of the input model): the search's
pipeline, and a sweep of single-pass pipelines (prune ratios, low-rank ranks, int8) and two-pass
pipelines (prune + int8, low rank + int8). All of them and the input model are timed in one
interleaved run at the end (ratios to the input measured side by side); error is ``1 − cosine`` of the
outputs on held-out inputs (digits: accuracy drop on the test split, the search sees a validation
split only). A target row compares the auto pipeline with the best sweep pipeline that meets the same
budget (measured latency within the tolerance, 5 %).

    python bench/bench_auto.py            # all three models, the full sweep
    python bench/bench_auto.py --quick    # coarser sweep, smaller timing budget (for a loaded machine)

Each run starts with an empty timing cache (``--reuse-timings`` keeps the user's), so the search
times include every measurement the search makes and no node timing taken under other load is reused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxcompress
from fxcompress import tuning
from fxcompress.models import init_batch_norm_statistics, resnet_small, transformer_small
from fxcompress.passes import EliminateIdentity, FoldBN, Int8, LowRank, PruneChannels
from fxcompress.capture import capture
from fxcompress.inputs import Inputs
from fxcompress.pass_base import PassContext
from fxcompress.search import Target, search
from fxcompress.search.space import apply
from fxcompress.verify import fidelity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_tag_argument, results_dir, write_results  # noqa: E402

TARGETS = (0.7, 0.5, 0.35)
TOLERANCE = 0.05


def resnet_case(quick: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    return {"name": "resnet_small 8x3x32x32", "model": init_batch_norm_statistics(resnet_small()), "example": (batches[0],),
            "calibration": batches[:2], "held_out": batches[2:], "metric": None}


def encoder_case(quick: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (8, 64), generator=g) for _ in range(4)]
    return {"name": "transformer_small 8x64", "model": transformer_small(), "example": (batches[0],),
            "calibration": batches[:2], "held_out": batches[2:], "metric": None}


def digits_case(quick: bool) -> dict:
    import distill_digits

    train, test = distill_digits.load_digits_split(0)
    x, y = train.tensors
    fit, validation = torch.utils.data.TensorDataset(x[:-256], y[:-256]), torch.utils.data.TensorDataset(x[-256:], y[-256:])
    model = distill_digits.train_classifier(distill_digits.DigitsCNN(), fit, 6 if quick else 20, seed=0)

    def validation_accuracy(candidate) -> float:
        return distill_digits.accuracy(candidate, validation) / 100

    def test_accuracy(candidate) -> float:
        return distill_digits.accuracy(candidate, test) / 100

    return {"name": "digits CNN 64x1x8x8 (accuracy)", "model": model, "example": (x[:64],), "calibration": [x[:64]],
            "held_out": None, "metric": validation_accuracy, "test_metric": test_accuracy}


def sweep(quick: bool) -> dict[str, list]:
    lossless = [EliminateIdentity(), FoldBN()]
    ratios = (0.25, 0.5, 0.75) if quick else (0.2, 0.35, 0.5, 0.65, 0.8)
    ranks = (0.5, 0.25, 0.125) if quick else (0.5, 0.375, 0.25, 0.125, 0.0625)
    pipelines = {f"prune_channels {r:g}": [*lossless, PruneChannels(ratio=r)] for r in ratios}
    pipelines |= {f"low_rank {r:g}": [*lossless, LowRank(rank=r)] for r in ranks}
    pipelines["int8"] = [*lossless, Int8()]
    pipelines["prune_channels 0.5 + int8"] = [*lossless, PruneChannels(ratio=0.5), Int8()]
    pipelines["low_rank 0.25 + int8"] = [*lossless, LowRank(rank=0.25), Int8()]
    return pipelines


def error_of(case: dict, model, outputs_ref) -> float:
    if case["metric"] is not None:
        return case["test_metric"](case["model"]) - case["test_metric"](model)
    with torch.no_grad():
        return 1.0 - fidelity(outputs_ref, [model(b) for b in case["held_out"]]).cosine


def run_case(case: dict, quick: bool) -> tuple[list[dict], list[dict], dict]:
    model, x = case["model"].eval(), case["example"]
    with torch.no_grad():
        reference = [model(b) for b in case["held_out"]] if case["held_out"] else None
    graph = capture(model, Inputs.of(x))
    ctx = PassContext(x, {})
    built, kinds, pipelines = {"input": model}, {"input": "input"}, {"input": []}
    for name, passes in sweep(quick).items():  # built on one capture by the pass manager, as optimize does
        built[name], kinds[name] = apply(graph, passes, ctx), "single" if "+" not in name else "two-pass"
        pipelines[name] = passes
    autos, search_seconds = {}, {}
    for fraction in TARGETS:
        target = Target(latency=fraction, metric=case["metric"], calibration=case["calibration"], tolerance=TOLERANCE)
        start, start_cpu = time.perf_counter(), time.process_time()
        found = search(model, x, target)
        search_seconds[fraction] = (time.perf_counter() - start, time.process_time() - start_cpu)
        print(f"\n## {case['name']}, target latency {fraction:g}: search {search_seconds[fraction][0]:.1f} s "
              f"({search_seconds[fraction][1]:.1f} s CPU)\n{found}", flush=True)
        name = f"auto latency={fraction:g}"
        built[name], kinds[name], pipelines[name] = apply(graph, found.passes(), ctx), "auto", found.passes()
        autos[fraction] = (name, found)
    timings = tuning.compare({n: (lambda m=m: m(*x)) for n, m in built.items()}, "cpu", 0.3 if quick else 1.0, 7 if quick else 11)
    rows = []
    for name, m in built.items():
        rows.append({"pipeline": name, "kind": kinds[name], "latency": timings[name].median_ms / timings["input"].median_ms,
                     "latency_iqr": timings[name].iqr_ms / timings["input"].median_ms,
                     "error": 0.0 if name == "input" else error_of(case, m, reference)})
    by_name = {r["pipeline"]: r for r in rows}
    summary = []
    for fraction, (name, found) in autos.items():
        auto = by_name[name]
        meeting = [r for r in rows if r["latency"] <= fraction * (1 + TOLERANCE)]
        best_single = min((r for r in meeting if r["kind"] == "single"), key=lambda r: r["error"], default=None)
        best_two = min((r for r in meeting if r["kind"] == "two-pass"), key=lambda r: r["error"], default=None)
        summary.append({
            "model": case["name"], "target": fraction, "auto latency": auto["latency"],
            "auto predicted": found.chosen.predicted, "auto error": auto["error"],
            "auto meets": auto["latency"] <= fraction * (1 + TOLERANCE),
            **_versus("single pass", best_single, auto, found, pipelines), **_versus("two-pass", best_two, auto, found, pipelines),
            "search s": search_seconds[fraction][0], "search cpu s": search_seconds[fraction][1], "rounds": len(found.rounds),
            "auto pipeline": found.chosen.name,
            "search message": found.message,
        })
    return rows, summary, {fraction: found for fraction, (_, found) in autos.items()}


def _versus(kind: str, best: dict | None, auto: dict, found, pipelines: dict) -> dict:
    """The best sweep pipeline of ``kind`` meeting the budget, and auto's error against it: ``better``,
    ``same pipeline`` (the search chose that very pipeline, one of its own baselines) or ``worse``."""
    if best is None:
        return {f"best {kind}": "none meets", f"{kind} latency": None, f"{kind} error": None, f"auto vs {kind}": "better (none meets)"}
    same = [p.config() for p in pipelines[best["pipeline"]]] == found.pipeline
    verdict = "same pipeline" if same else "better" if auto["error"] < best["error"] else "worse"
    return {f"best {kind}": best["pipeline"], f"{kind} latency": best["latency"], f"{kind} error": best["error"],
            f"auto vs {kind}": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="coarser sweep grids and shorter end-to-end timing")
    parser.add_argument("--models", default="resnet,encoder,digits", help="comma-separated subset of resnet,encoder,digits")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse-timings", action="store_true",
                        help="reuse the node timings cached by earlier runs (default: a fresh timing cache, so no timing "
                             "taken under other load is reused and the search time includes all its measurements)")
    add_tag_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.reuse_timings:
        os.environ["FXCOMPRESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_auto_timings_")
    cases = {"resnet": resnet_case, "encoder": encoder_case, "digits": digits_case}
    all_rows, all_summary, plots, searches = {}, [], [], {}
    for key in args.models.split(","):
        case = cases[key](args.quick)
        rows, summary, found = run_case(case, args.quick)
        all_rows[case["name"]] = rows
        all_summary += summary
        searches[case["name"]] = {str(fraction): result.to_dict() for fraction, result in found.items()}
        print(tabulate(summary, headers="keys", tablefmt="github", floatfmt=".4g"), flush=True)
        plots.append(_plot(found[0.5], key, args.tag))
        print(f"{case['name']}: search {sum(r['search s'] for r in summary):.1f} s "
              f"({sum(r['search cpu s'] for r in summary):.1f} s CPU) for the {len(TARGETS)} targets "
              f"(the first includes the analysis the others reuse); Pareto plot: {plots[-1] or 'none (pip install matplotlib)'}",
              flush=True)
        path = _write(all_summary, all_rows, searches, plots, args)  # after every model: a timeout keeps what is done
    print(f"\nwritten: {path}")


def _write(all_summary: list, all_rows: dict, searches: dict, plots: list, args) -> Path:
    table = tabulate(all_summary, headers="keys", tablefmt="github", floatfmt=".4g")
    detail = "\n\n".join(f"### {name}\n\n" + tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g")
                         for name, rows in all_rows.items())
    totals = {}
    for row in all_summary:
        totals[row["model"]] = totals.get(row["model"], 0.0) + row["search s"]
    note = ("auto: optimize(target=Target(latency=t)); error: 1 - cosine on held-out inputs (digits: test-accuracy drop, "
            "as a fraction); latency: median of interleaved rounds, ratio to the input model; 'auto predicted': the cost "
            "model's prediction for the chosen pipeline; single-pass and two-pass rows: the best sweep pipeline meeting the "
            "budget (two-pass: the README's hand-written prune/low rank + int8). Search time for the three targets: "
            + ", ".join(f"{m} {s:.0f} s" for m, s in totals.items()) + ". Plots (target 0.5): " + ", ".join(p for p in plots if p))
    return write_results("bench_auto" + ("_quick" if args.quick else ""),
                         {"summary": all_summary, "rows": all_rows, "searches": searches, "quick": args.quick},
                         f"{note}\n\n{table}\n\n{detail}", args.tag)


def _plot(found, key: str, tag: str | None) -> str | None:
    try:
        out = results_dir(tag)
        out.mkdir(parents=True, exist_ok=True)
        return Path(found.plot(out / f"bench_auto_{key}_pareto.png")).name
    except fxcompress.InvalidInputError:  # matplotlib not installed: the table only
        return None


if __name__ == "__main__":
    main()
