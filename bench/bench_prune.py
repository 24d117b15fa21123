"""Benchmark prune_channels (and, if installed, Torch-Pruning 1.6 side by side).

    python bench/bench_prune.py [--ratios 0.3 0.5] [--models resnet mobilenet_v2 hf_bert ...]

Writes bench/results/<machine>/prune_channels.json and .md: MACs, params and CPU latency of the pruned
model relative to the unpruned one, per model and ratio, for both tools on the same models,
inputs and ratio, plus how many models each tool prunes without error and with unchanged
output shapes. Torch-Pruning is the optional ``bench`` extra (``pip install -e .[bench]``).
Torch-Pruning runs with its documented recipe: MetaPruner, L1 magnitude importance, the final
classifier layer (out_features == number of classes) in ``ignored_layers``.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.utils import _pytree as pytree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxcompress import models as fxc_models  # noqa: E402
from fxcompress import tuning  # noqa: E402
from fxcompress.capture import capture  # noqa: E402
from fxcompress.pass_base import PassContext  # noqa: E402
from fxcompress.passes.prune_channels import PruneChannels  # noqa: E402
from fxcompress.report import count_macs  # noqa: E402
from tests import prune_zoo  # noqa: E402

from common import add_tag_argument, write_results

NUM_CLASSES = 10
TIME_LIMIT_S = 300


def bench_models() -> dict:
    """Benchmark-sized zoo: name -> (model factory, inputs factory)."""
    models = {
        "resnet": (lambda: prune_zoo.ResNetLike((32, 64, 128, 256)), lambda: prune_zoo.image(8, 64)),
        "mobilenet_v2": (prune_zoo.MobileNetV2Like, lambda: prune_zoo.image(8, 64)),
        "hf_bert": (lambda: prune_zoo.hf_bert(hidden=128, layers=4, heads=4), lambda: prune_zoo.tokens(8, 64)),
    }
    for name, entry in prune_zoo.zoo().items():
        models.setdefault(name, entry)
    models.update({
        "fxc.resnet_small": (fxc_models.resnet_small, lambda: fxc_models.image_batch(8, 32)),
        "fxc.mobilenet_small": (fxc_models.mobilenet_small, lambda: fxc_models.image_batch(8, 32)),
        "fxc.transformer_small": (fxc_models.transformer_small, lambda: fxc_models.token_batch(8, 64)),
        "fxc.bert_base_like": (lambda: fxc_models.bert_base_like(layers=2), lambda: fxc_models.token_batch(8, 64, 30522)),
    })
    return models


def output_shapes(module, ctx: PassContext) -> list:
    with torch.no_grad():
        return [tuple(t.shape) for t in pytree.tree_leaves(ctx.run(module)) if isinstance(t, torch.Tensor)]


def latency_ratio(after, before, ctx: PassContext) -> float:
    """Median latency of ``after`` / ``before``, timed interleaved (``tuning.compare``)."""
    timings = tuning.compare({"after": lambda: ctx.run(after), "before": lambda: ctx.run(before)}, "cpu", min_run_time=0.3)
    return timings["after"].median_ms / timings["before"].median_ms


def measure(before, after, ctx: PassContext) -> dict:
    return {
        "macs": count_macs(after, ctx) / count_macs(before, ctx),
        "params": sum(p.numel() for p in after.parameters()) / sum(p.numel() for p in before.parameters()),
        "latency": latency_ratio(after, before, ctx),
        "shapes_same": output_shapes(after, ctx) == output_shapes(before, ctx),
    }


def run_fxcompress(model, inputs, ratio: float) -> dict:
    ctx = PassContext.of(inputs)
    before = capture(model, inputs)
    after = copy.deepcopy(before)
    start = time.perf_counter()
    PruneChannels(ratio=ratio).run(after, ctx)
    return {**measure(before, after, ctx), "seconds": time.perf_counter() - start}


def run_torch_pruning(model, inputs, ratio: float) -> dict:
    import torch_pruning as tp

    ctx = PassContext.of(inputs)
    before, after = model, copy.deepcopy(model)
    ignored = [m for m in after.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        after, inputs if isinstance(inputs, tuple) else inputs, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=ignored,
    )
    pruner.step()
    return {**measure(before, after, ctx), "seconds": time.perf_counter() - start}


class TimeLimit(Exception):
    pass


def guarded(fn, *args) -> dict:
    def alarm(signum, frame):
        raise TimeLimit(f"did not finish within {TIME_LIMIT_S} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        return fn(*args)
    except Exception as exc:  # any failure of a tool on a model is a result to report
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}",
                "trace": traceback.format_exc(limit=3)}
    finally:
        signal.alarm(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1)
    add_tag_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import torch_pruning  # noqa: F401

        tools = {"fxcompress": run_fxcompress, "torch_pruning": run_torch_pruning}
    except ImportError:
        tools = {"fxcompress": run_fxcompress}
    models = bench_models()
    rows = []
    for name in args.models or list(models):
        factory, inputs_factory = models[name]
        for ratio in args.ratios:
            for tool, fn in tools.items():
                torch.manual_seed(0)
                result = guarded(fn, factory().eval(), inputs_factory(), ratio)
                rows.append({"model": name, "ratio": ratio, "tool": tool, **result})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
    write(rows, tools, args.tag)


def write(rows: list[dict], tools: dict, tag: str | None) -> None:
    table = [[r["model"], r["ratio"], r["tool"],
              *(f"{r[k]:.3f}" if k in r else "-" for k in ("macs", "params", "latency")),
              r.get("shapes_same", "-"), f"{r['seconds']:.1f}" if "seconds" in r else "-", r.get("error", "")]
             for r in rows]
    summary = []
    for tool in tools:
        mine = [r for r in rows if r["tool"] == tool]
        ok = [r for r in mine if "error" not in r and r["shapes_same"]]
        summary.append([tool, f"{len(ok)}/{len(mine)}", len([r for r in mine if "error" in r]),
                        len([r for r in mine if "error" not in r and not r["shapes_same"]])])
    text = "\n\n".join([
        "Ratios are pruned / unpruned (MACs from FlopCounterMode, latency = median CPU forward, both timed interleaved).",
        tabulate(table, headers=["model", "ratio", "tool", "MACs", "params", "latency", "shapes same", "prune s", "error"],
                 tablefmt="github"),
        tabulate(summary, headers=["tool", "ok (no error, same shapes)", "errors", "changed output shapes"], tablefmt="github"),
    ])
    write_results("prune_channels", {"rows": rows}, text, tag)
    print(text)


if __name__ == "__main__":
    main()
