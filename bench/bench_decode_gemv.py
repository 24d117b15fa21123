"""Decode-shaped GEMVs (one row) on the CPU: every int8 candidate against fp32, with the weights hot and cold.

    python bench/bench_decode_gemv.py              # Llama-style shapes (hidden 2048 and 1024, vocab 32k), 2 threads
    python bench/bench_decode_gemv.py --threads 1

"hot": the same weight every call (what a loop over one layer measures: it sits in L2/L3). "cold": each
call reads the next of enough copies that one cycle reads 256 MiB (``passes/_int8_lowering.cold_weight_calls``,
what a decoding step sees: the rest of the model streams through the caches between two calls of a layer).
Candidates are the ops the int8 pass emits: fp32 ``aten.linear``, ``fxcompress::int8_linear`` (``torch._int_mm``,
per-token W8A8), ``fxcompress::int8_linear_qengine`` (FBGEMM / x86 / oneDNN prepacked dynamic linear),
``fxcompress::int8_weight_only_linear`` (fp32 activations) and ``..._bf16`` (bf16 activations). Interleaved
timing (``fxcompress.tuning.compare``); speedups are fp32's time over the candidate's, in the same regime.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
from tabulate import tabulate

import fxcompress.ops  # noqa: F401  (registers torch.ops.fxcompress.*)
from fxcompress import tuning
from fxcompress.ops.int8_linear import quantize_weight_per_channel

import common

SHAPES = [(1024, 1024), (2816, 1024), (1024, 2816), (2048, 2048), (512, 2048), (5632, 2048), (2048, 5632), (32000, 2048)]
COLD_BYTES = 256 << 20
fx = torch.ops.fxcompress


def candidates(x: torch.Tensor, weight: torch.Tensor) -> dict:
    """name -> (function of the weights tuple, the weights tuple, bytes one call reads)."""
    weight_q, scale = quantize_weight_per_channel(weight)
    int8 = (weight_q, scale)
    found = {"fp32": (lambda w: torch.nn.functional.linear(x, w[0]), (weight,), weight.numel() * 4),
             "int_mm": (lambda w: fx.int8_linear(x, w[0], w[1], None, "none"), int8, weight_q.numel()),
             "weight_only fp32 act": (lambda w: fx.int8_weight_only_linear(x, w[0], w[1], None), int8, weight_q.numel()),
             "weight_only bf16 act": (lambda w: fx.int8_weight_only_linear_bf16(x, w[0], w[1], None), int8, weight_q.numel())}
    for engine in ("fbgemm", "x86", "onednn"):
        if engine in torch.backends.quantized.supported_engines:
            found[f"qengine:{engine}"] = (lambda w, e=engine: fx.int8_linear_qengine(x, w[0], w[1], None, "none", e), int8, weight_q.numel())
    return found


def cycling(fn, weights: tuple, nbytes: int):
    copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(max(1, math.ceil(COLD_BYTES / nbytes)) - 1)]
    with torch.no_grad():
        for w in copies:  # engines pack each copy on first use
            fn(w)
    cycle = itertools.cycle(copies)
    return lambda: fn(next(cycle))


def measure(n: int, k: int, rounds: int, min_run_time: float) -> list[dict]:
    torch.manual_seed(0)
    x, weight = torch.randn(1, k), torch.randn(n, k) / k ** 0.5
    found = candidates(x, weight)
    rows = []
    for regime in ("hot", "cold"):
        fns = {name: (lambda fn=fn, w=w: fn(w)) if regime == "hot" else cycling(fn, w, nbytes) for name, (fn, w, nbytes) in found.items()}
        timings = tuning.compare(fns, "cpu", min_run_time, rounds)
        del fns
        for name, t in timings.items():
            rows.append({"N x K": f"{n} x {k}", "weights": regime, "candidate": name, "ms": t.median_ms, "iqr_ms": t.iqr_ms,
                         "vs_fp32": timings["fp32"].median_ms / t.median_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    common.add_tag_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for n, k in SHAPES for row in measure(n, k, args.rounds, args.min_run_time)]
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g")
    command = "python bench/bench_decode_gemv.py" + (f" --threads {args.threads}" if args.threads != 2 else "")
    print(common.write_results(f"decode_gemv_{args.threads}thread{'s' if args.threads > 1 else ''}", {"command": command, "rows": rows},
                               f"{table}\n\ncommand: `{command}`; cold = copies cycled over {COLD_BYTES >> 20} MiB", args.tag))
    print(table)


if __name__ == "__main__":
    main()
