"""CPU latency of eager vs torch.compile (Inductor) vs torch.compile(backend="fxcompress").

    python bench/bench_backend.py [--threads 2] [--repeats 20]

Variants, measured side by side in one run: eager, inductor, fxcompress (default lossless passes),
fxcompress+int8 (when the int8 pass is registered). Reports median latency, speedup vs eager and vs
Inductor, compile time (first call) and fidelity. Writes bench/results/backend_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

import fxcompress
from fxcompress import tuning
from fxcompress.models import bert_base_like, image_batch, init_batch_norm_statistics, resnet_small, token_batch
from fxcompress.verify import fidelity

from common import write_results

WORKLOADS = {
    "resnet_small@8x3x64x64": (lambda: init_batch_norm_statistics(resnet_small(1000)), lambda: image_batch(8, 64)),
    "bert_base_like(2 layers)@8x128": (lambda: bert_base_like(2), lambda: token_batch(8, 128, 30522)),
}


def variants() -> dict:
    out = {"eager": None, "inductor": "inductor", "fxcompress": "fxcompress"}
    if "int8" in fxcompress.registered_passes():
        out["fxcompress+int8"] = fxcompress.backend(passes=[*fxcompress.DEFAULT_PASSES, "int8"])
    return out


def median_ms(fn, inputs, repeats: int) -> float:
    """Median forward time by the project's timing helper (``torch.utils.benchmark.Timer`` blocks)."""
    return tuning.compare({"fn": lambda: fn(*inputs)}, "cpu", min_run_time=0.02 * repeats, rounds=repeats)["fn"].median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (factory, make_inputs) in WORKLOADS.items():
        model, inputs = factory(), make_inputs()
        with torch.no_grad():
            reference = model(*inputs)
            results = {}
            for variant, compiler in variants().items():
                torch._dynamo.reset()
                fn = model if compiler is None else torch.compile(model, backend=compiler)
                start = time.perf_counter()
                output = fn(*inputs)
                compile_s = time.perf_counter() - start if compiler is not None else 0.0
                results[variant] = (median_ms(fn, inputs, args.repeats), compile_s, fidelity(reference, output).cosine)
        for variant, (ms, compile_s, cosine) in results.items():
            rows.append({
                "model": name, "variant": variant, "latency_ms": round(ms, 3),
                "speedup_vs_eager": round(results["eager"][0] / ms, 3),
                "speedup_vs_inductor": round(results["inductor"][0] / ms, 3),
                "compile_s": round(compile_s, 2), "cosine_vs_eager": round(cosine, 6),
            })
    table = tabulate(rows, headers="keys", tablefmt="github")
    print(table)
    write_results("backend_cpu", {"threads": args.threads, "rows": rows}, table)


if __name__ == "__main__":
    main()
