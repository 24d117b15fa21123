"""Public model zoos through every pass variant: what runs, what fails and why, what it costs.

    python bench/run_zoo.py --families torchvision-classification [--variants default prune_ratio int8]
                            [--models resnet vit_b] [--limit 10] [--timeout 600] [--max-params 100e6]

Every zoo, on the idle machine (each line resumes where the last run stopped):

    pip install --no-deps --target /tmp/tvlib torchvision==0.28.0 pillow   # not into the venv: it breaks transformers
    pip install --no-deps --target /tmp/timmlib timm==1.0.31               # needs huggingface_hub, safetensors, pyyaml (present)
    export PYTHONPATH=/tmp/tvlib:/tmp/timmlib
    python bench/run_zoo.py --families torchvision-classification torchvision-segmentation --threads 2
    python bench/run_zoo.py --families timm --threads 2
    python bench/run_zoo.py --families hf --threads 2      # transformers (a dev dependency), configs only

For each model (``bench/zoo_models.py``: torchvision classification + segmentation, timm, HF configs;
random weights, small inputs, batch 2) and each variant in ``VARIANTS`` (the default pipeline, then
``PruneChannels(ratio=0.5)``, ``PruneChannels(target_macs=0.5)``, ``LowRank(target_macs=0.7)``,
``Int8()`` each after it): whether the verified pipeline runs, the MACs reached, the wall time and peak memory of every pass
(``bench/pass_cost.py``), and every skip reason the report gives; once per model, pruning's mask
equivalence (``tests.test_prune_channels.graph_mask_equivalence``: zeroing the chosen channels in the
original == removing them). Each model is captured once (``capture``: wall time, peak memory, the dynamic
dims kept and why the others are static) and every variant runs a ``PassManager`` on a deep copy of that
graph, with the report ``optimize`` would build, so capture time is not counted five times. Every model runs in its own subprocess with a timeout, so a crash or hang
costs one model. Results go to ``bench/results/<machine>/zoo.{json,md}`` after every model; a rerun
skips the (model, variant) pairs already there (``--redo`` reruns them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

VARIANT_NAMES = ("default", "prune_ratio", "prune_macs", "low_rank", "int8")
MASK = "mask_equivalence"
CAPTURE = "capture"  # once per model; every variant runs on a copy of its graph
MASK_TOLERANCE = 1e-4  # relative to max |output|
NAME = "zoo"


def variant_passes(variant: str) -> list:
    from fxcompress import DEFAULT_PASSES, passes

    extra = {
        "default": [],
        "prune_ratio": [passes.PruneChannels(ratio=0.5)],
        "prune_macs": [passes.PruneChannels(target_macs=0.5)],
        "low_rank": [passes.LowRank(target_macs=0.7)],
        "int8": [passes.Int8()],
    }[variant]
    return [*DEFAULT_PASSES, *extra]


# --- worker: one model, the requested variants, one JSON line per result --------------------------------


def capture_once(model, inputs) -> tuple:
    """(graph, eager reference outputs, the capture's record): one capture per model, every variant
    runs on a copy of its graph (as ``fxcompress.optimize`` would, minus the capture)."""
    from fxcompress.capture import capture_owned, eval_copy, run_eagerly
    from fxcompress.inputs import Inputs
    from pass_cost import peak_bytes, reset_peak

    inputs = Inputs.of(inputs)
    owned = eval_copy(model, warn=False)
    reference = run_eagerly(owned, inputs)
    rss = reset_peak()
    start = time.perf_counter()
    graph = capture_owned(owned, inputs, reference)
    seconds = time.perf_counter() - start
    shapes = graph.meta["fxcompress_shapes"]
    return graph, reference, {"status": "ok", "capture_s": seconds, "peak_extra_bytes": max(peak_bytes() - rss, 0),
                              "dynamic": shapes.dynamic(), "specialized": shapes.specialized()}


def run_variant(graph, inputs, reference, variant: str) -> dict:
    """``variant``'s pipeline on a copy of ``graph``, verified and reported as ``optimize`` does."""
    import copy

    from fxcompress import PassManager, ReportConfig
    from fxcompress.pass_base import PassContext
    from fxcompress.report import ReportBuilder
    from pass_cost import PassCost, peak_bytes, reset_peak

    gm = copy.deepcopy(graph)
    builder, cost = ReportBuilder(reference, ReportConfig(latency=False)), PassCost()
    manager = PassManager(variant_passes(variant), instrumentations=[builder, cost])
    rss = reset_peak()
    start = time.perf_counter()
    manager.run(gm, PassContext.of(inputs))
    wall = time.perf_counter() - start
    report = builder.report
    first, last = report.rows[0], report.rows[-1]
    return {
        "status": "ok", "wall_s": wall, "peak_extra_bytes": max(peak_bytes() - rss, 0), "passes": cost.rows,
        "macs_in": first["macs"], "macs_out": last["macs"], "macs_ratio": last["macs"] / max(first["macs"], 1),
        "params_ratio": last["params"] / max(first["params"], 1), "cosine": last["cosine"],
        "second_shape": manager.probe.description if manager.probe is not None else None,
        "skipped": report.skipped_summary(), "details": _prune_summary(report),
    }


def _prune_summary(report) -> dict | None:
    result = next((r for stage, r in report.results.items() if stage.startswith("prune_channels")), None)
    return result.details[0] if result is not None and result.details else None


def mask_equivalence(model, graph, inputs) -> dict:
    """Zeroing the channels pruning would remove == removing them, on a copy of ``graph`` whose norm
    layers (``model``'s, by name) get random affine parameters and statistics, so no channel is trivial."""
    import copy

    import torch
    from torch.utils import _pytree as pytree

    from tests.test_prune_channels import ctx_of, graph_mask_equivalence, randomize_norms

    gm = copy.deepcopy(graph)
    norms = randomize_norms(copy.deepcopy(model))
    with torch.no_grad():
        for name, tensor in [*norms.named_parameters(), *norms.named_buffers()]:
            target = _graph_tensor(gm, name)
            if target is not None and target.shape == tensor.shape:
                target.copy_(tensor)
    ctx = ctx_of(inputs)
    with torch.no_grad():
        scale = max(float(t.abs().max()) for t in pytree.tree_leaves(ctx.run(gm)) if isinstance(t, torch.Tensor) and t.is_floating_point())
    error, removed = graph_mask_equivalence(gm, ctx, ratio=0.5)
    relative = error / max(scale, 1e-12)
    return {"status": "ok" if relative <= MASK_TOLERANCE else "error", "relative_error": relative, "removed_indices": removed,
            **({} if relative <= MASK_TOLERANCE else {"error": f"mask equivalence: relative error {relative:.3g} > {MASK_TOLERANCE}"})}


def _graph_tensor(gm, dotted: str):
    from fxcompress import ir

    try:
        return ir.get_attr(gm, dotted)
    except AttributeError:  # folded or renamed by export: nothing to randomize
        return None


def failure(exc: BaseException) -> dict:
    from fxcompress.errors import VerificationError

    lines = traceback.format_exception(exc)
    where = exc.pass_name if isinstance(exc, VerificationError) else _frame(exc)
    return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).strip()}"[:2000], "where": where,
            "traceback": "".join(lines[-6:])[-3000:]}


def _frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "fxcompress" in f.filename or "/passes/" in f.filename]
    frame = (ours or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def worker(key: str, variants: list[str], out: Path, threads: int, max_params: float) -> None:
    import torch

    from zoo_models import zoo

    torch.set_num_threads(threads)
    entry = zoo([key.split("/", 1)[0]])[key]

    def emit(variant: str, record: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps({"variant": variant, **record}, default=str) + "\n")

    try:
        torch.manual_seed(0)
        model = entry.build().eval()
        inputs = entry.inputs()
    except Exception as exc:  # the zoo's own constructor: not fxcompress's failure
        emit("build", {**failure(exc), "status": "build_failed"})
        return
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        emit("build", {"status": "too_large", "params": params, "error": f"{params / 1e6:.0f}M parameters > --max-params"})
        return
    emit("build", {"status": "ok", "params": params, "note": entry.note})
    try:
        graph, reference, record = capture_once(model, inputs)
    except Exception as exc:
        graph, record = None, failure(exc)
    emit(CAPTURE, record)
    for variant in variants:
        if graph is None:
            emit(variant, {"status": "error", "error": f"not run: capture failed ({record['error'][:300]})", "where": "capture"})
            continue
        try:
            record = mask_equivalence(model, graph, inputs) if variant == MASK else run_variant(graph, inputs, reference, variant)
        except Exception as exc:
            record = failure(exc)
        emit(variant, record)


# --- driver ----------------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    return json.loads(path.read_text()).get("models", {}) if path.exists() else {}


def run_model(key: str, variants: list[str], timeout: float, threads: int, max_params: float) -> dict:
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"zoo_{os.getpid()}_{re.sub(r'[^A-Za-z0-9]+', '_', key)}.jsonl"
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--worker", key, "--out", str(out), "--threads", str(threads),
               "--max-params", str(max_params), "--variants", *variants]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        ended = None if proc.returncode == 0 else f"worker exited with {proc.returncode}: {proc.stderr.strip()[-800:]}"
    except subprocess.TimeoutExpired:
        ended = f"timeout after {timeout:.0f} s"
    records = {}
    if out.exists():
        for line in out.read_text().splitlines():
            record = json.loads(line)
            records[record.pop("variant")] = record
        out.unlink()
    for variant in ["build", CAPTURE, *variants]:
        if variant not in records and ended:
            records[variant] = {"status": "timeout" if ended.startswith("timeout") else "crashed", "error": ended}
            ended = ended if ended.startswith("timeout") else "not run: the worker crashed on an earlier variant"
        if records.get("build", {}).get("status") in ("build_failed", "too_large"):
            break
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", help="torchvision-classification torchvision-segmentation timm hf (default: all)")
    parser.add_argument("--models", nargs="*", help="only models whose key contains one of these substrings")
    parser.add_argument("--limit", type=int, help="at most this many models (after --models)")
    parser.add_argument("--variants", nargs="*", default=[*VARIANT_NAMES, MASK], help=f"default: {' '.join(VARIANT_NAMES)} {MASK}")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model (all its variants)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-params", type=float, default=float("inf"), help="skip (for now) models with more parameters")
    parser.add_argument("--redo", action="store_true", help="rerun (model, variant) pairs already in the results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    from common import add_tag_argument, results_dir

    add_tag_argument(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.variants, args.out, args.threads, args.max_params)
    from zoo_models import zoo
    from zoo_report import write_zoo

    keys = [k for k in zoo(args.families) if not args.models or any(m in k for m in args.models)][: args.limit]
    path = results_dir(args.tag) / f"{NAME}.json"
    results = load(path)
    for number, key in enumerate(keys, 1):
        done = results.get(key, {})
        build = done.get("build", {})
        if build.get("status") == "too_large" and build["params"] <= args.max_params:
            done = {}
        todo = [v for v in args.variants if args.redo or v not in done or done[v].get("status") in ("timeout", "crashed")]
        if not todo or build.get("status") in ("build_failed", "too_large") and not args.redo and done:
            continue
        start = time.perf_counter()
        results[key] = {**done, **run_model(key, todo, args.timeout, args.threads, args.max_params)}
        statuses = " ".join(f"{v}={results[key].get(v, {}).get('status')}" for v in todo)
        print(f"[{number}/{len(keys)}] {key} ({time.perf_counter() - start:.0f} s): {statuses}", flush=True)
        write_zoo(results, args.tag)
    print("\n".join(write_zoo(results, args.tag)))


if __name__ == "__main__":
    main()
