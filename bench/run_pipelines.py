"""Per-pass report of the default pipeline on the example models the package ships.

    python bench/run_pipelines.py [--threads 2] [--repeats 30]

Writes bench/results/pipelines_cpu.{json,md}.
"""

from __future__ import annotations

import argparse

import torch

import fxcompress
from fxcompress.models import EXAMPLES, bert_base_like, image_batch, init_batch_norm_statistics, resnet_small, token_batch

from common import write_results

WORKLOADS = {
    **{name: (factory, inputs) for name, (factory, inputs) in EXAMPLES.items()},
    "resnet_small@224": (lambda: init_batch_norm_statistics(resnet_small(1000)), lambda: image_batch(8, 224)),
    "bert_base_like(4 layers)@8x128": (lambda: bert_base_like(4), lambda: token_batch(8, 128, 30522)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--passes", default=None, help="comma-separated pipeline (default: fxcompress.DEFAULT_PASSES)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    passes = args.passes.split(",") if args.passes else None
    results, tables = {}, []
    for name, (factory, inputs) in WORKLOADS.items():
        compressed = fxcompress.optimize(factory(), inputs(), passes, report=fxcompress.ReportConfig(warmup=3, repeats=args.repeats))
        results[name] = compressed.report.to_dict()
        tables.append(f"## {name}\n\n{compressed.report.table()}\n")
        print(tables[-1])
    write_results("pipelines_cpu", {"threads": args.threads, "workloads": results}, "\n".join(tables))


if __name__ == "__main__":
    main()
