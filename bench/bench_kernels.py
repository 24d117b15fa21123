"""Every candidate GEMM kernel the int8 pass chooses from, timed side by side on this machine.

    python bench/bench_kernels.py                    # BERT-like and decode shapes, 1 and 2 threads
    python bench/bench_kernels.py --threads 1 --tag my-idle-box

Shapes: M = 1024 tokens (8×128) with (K, N) = (768, 768), (768, 3072), (3072, 768), and M = 1 (decode).
The candidates are the int8 pass's own (``fxcompress.tuning`` families, so the table is what
``Int8()`` measures when it picks a lowering) plus bf16 references. All kernels of one shape and
thread count are timed interleaved (``fxcompress.tuning.compare``: median and IQR of blocks).
Results: ``bench/results/<tag or machine slug>/kernels_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from fxcompress import tuning
from fxcompress.passes import _int8_lowering as lowering
from fxcompress.ops.int8_linear import quantize_weight_per_channel

from common import add_tag_argument, machine_info, write_results

SHAPES = [(M, K, N) for M in (1024, 1) for K, N in ((768, 768), (768, 3072), (3072, 768))]


def gemm_problem(M: int, K: int, N: int, dtype: torch.dtype = torch.float32) -> lowering.GemmProblem:
    torch.manual_seed(0)
    x, w, b = torch.randn(M, K, dtype=dtype), (torch.randn(N, K) / K**0.5).to(dtype), torch.randn(N, dtype=dtype)
    w_q, w_scale = quantize_weight_per_channel(w)
    return lowering.GemmProblem(device=torch.device("cpu"), x=x, op_args=(w_q, w_scale, b, "none"),
                                float_run=lambda: torch.nn.functional.linear(x, w, b))


def kernels(M: int, K: int, N: int) -> dict:
    """name -> (callable, reference output) for every candidate available here."""
    fp32 = gemm_problem(M, K, N)
    bf16 = gemm_problem(M, K, N, torch.bfloat16)
    weight_only = lambda p: lowering.GemmProblem(p.device, p.x, p.op_args[:3], p.float_run)  # noqa: E731
    runs = {"fp32 linear (float)": (fp32.float_run, fp32), "bf16 linear": (bf16.float_run, bf16)}
    for name, candidate in tuning.family(lowering.FAMILIES["dynamic"]).candidates.items():
        if name != "float" and candidate.available(fp32):
            runs[f"w8a8 {name}"] = (lambda c=candidate: c.run(fp32), fp32)
    only = tuning.family(lowering.FAMILIES["weight_only"]).candidates["int8_weight_only"]
    runs["w8a32 int8_weight_only (dequantize + fp32 GEMM)"] = (lambda: only.run(weight_only(fp32)), fp32)
    runs["w8a16 int8_weight_only (_weight_int8pack_mm, bf16)"] = (lambda: only.run(weight_only(bf16)), bf16)
    return runs


def shape_rows(M: int, K: int, N: int, threads: int, min_run_time: float, rounds: int) -> list[dict]:
    torch.set_num_threads(threads)
    runs = kernels(M, K, N)
    timings = tuning.compare({name: fn for name, (fn, _) in runs.items()}, "cpu", min_run_time, rounds)
    base = timings["fp32 linear (float)"].median_ms
    rows = []
    with torch.no_grad():
        for name, (fn, problem) in runs.items():
            t = timings[name]
            rows.append({
                "threads": threads, "M": M, "K": K, "N": N, "kernel": name, "median_ms": t.median_ms, "iqr_ms": t.iqr_ms,
                "speedup_vs_fp32": base / t.median_ms,
                "measurable": tuning.speedup_is_measurable(timings["fp32 linear (float)"], t),
                "rel_err_vs_own_float": lowering.relative_error(fn(), problem.float_run()),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--min-run-time", type=float, default=0.4, help="seconds of timing per kernel and shape")
    parser.add_argument("--rounds", type=int, default=7)
    add_tag_argument(parser)
    args = parser.parse_args()
    rows = [row for threads in args.threads for shape in SHAPES for row in shape_rows(*shape, threads, args.min_run_time, args.rounds)]
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g")
    machine = machine_info()
    note = (f"CPU: {machine['cpu']} (flags: {machine['cpu_flags']}), load average at the end {machine['load_average']}. "
            "Each shape's kernels were timed interleaved; `measurable` is False where the IQR exceeds the difference to fp32.")
    print(write_results("kernels_cpu", {"rows": rows, "note": note}, f"{note}\n\n{table}", args.tag))
    print(table)


if __name__ == "__main__":
    main()
