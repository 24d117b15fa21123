"""Pass cost against model size: wall time and peak memory per parameter, ResNet-18 -> 152, BERT-base ->
large, Llama-style decoders up to ~1B parameters.

    python bench/bench_scaling.py [--models resnet18 resnet50 bert-base] [--variants default prune_ratio int8]
                                  [--threads 2] [--timeout 900]

Each (model, variant) runs ``fxcompress.optimize`` (report without latency) in its own subprocess, so the
peak resident memory of every pass (``bench/pass_cost.py``) is its own. The table gives, per pass, seconds
per million parameters and the peak working set in units of the model's weight bytes (the issue's
targets: flat in model size, <= 2.5x). Writes ``bench/results/<machine>/scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from common import add_tag_argument, write_results  # noqa: E402


def _resnet(depth: int):
    def build():
        from zoo_models import import_torchvision

        return getattr(import_torchvision().models, f"resnet{depth}")(weights=None)
    return build, lambda: (torch.randn(2, 3, 64, 64),)


def _bert(hidden: int, layers: int, heads: int):
    def build():
        import transformers

        return transformers.BertModel(transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                                              intermediate_size=4 * hidden))
    return build, lambda: {"input_ids": torch.randint(0, 30000, (2, 32), generator=torch.Generator().manual_seed(0))}


def _llama(hidden: int, layers: int, intermediate: int, dtype: torch.dtype = torch.float32):
    def build():
        import transformers

        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                                          num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, use_cache=False)
        return transformers.LlamaForCausalLM(config).to(dtype)
    return build, lambda: {"input_ids": torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))}


MODELS = {
    "resnet18": _resnet(18), "resnet34": _resnet(34), "resnet50": _resnet(50), "resnet101": _resnet(101), "resnet152": _resnet(152),
    "bert-small": _bert(256, 4, 4), "bert-base": _bert(768, 12, 12), "bert-large": _bert(1024, 24, 16),
    "llama-160m": _llama(768, 8, 2048), "llama-500m": _llama(1536, 12, 4096), "llama-1b-bf16": _llama(2048, 16, 5632, torch.bfloat16),
}


def worker(name: str, variant: str, threads: int) -> dict:
    from run_zoo import run_variant

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    build, inputs = MODELS[name]
    model = build().eval()
    params = sum(p.numel() for p in model.parameters())
    record = run_variant(model, inputs(), variant)
    return {"params": params, **{k: record[k] for k in ("wall_s", "peak_extra_bytes", "passes", "macs_ratio")}}


def table(results: dict) -> str:
    rows = []
    for key, r in results.items():
        if "error" in r:
            rows.append([key, "", "", "", r["error"][:100]])
            continue
        setup = r["wall_s"] - sum(p["seconds"] for p in r["passes"])
        for p in r["passes"]:
            rows.append([key, f"{r['params'] / 1e6:.1f}", p["pass"], f"{p['seconds']:.2f}", f"{1e6 * p['seconds'] / r['params']:.4f}",
                         f"{p['peak_x_weights']:.2f}"])
        rows.append([key, f"{r['params'] / 1e6:.1f}", "(capture + input measurement)", f"{setup:.2f}", f"{1e6 * setup / r['params']:.4f}",
                     f"{1 + r['peak_extra_bytes'] / max(r['passes'][0]['weight_bytes'], 1):.2f} (whole run)" if r["passes"] else ""])
    return tabulate(rows, headers=["model/variant", "params M", "pass", "s", "s per M params", "peak x weights"], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50", "resnet152", "bert-small", "bert-base", "bert-large"])
    parser.add_argument("--variants", nargs="*", default=["default", "prune_ratio", "int8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    add_tag_argument(parser)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.threads), default=str))
        return
    results = {}
    for name in args.models:
        for variant in args.variants:
            key = f"{name}/{variant}"
            start = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--worker", name, variant, "--threads", str(args.threads)],
                                      capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                results[key] = json.loads(line[7:]) if line else {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no result"}
            except subprocess.TimeoutExpired:
                results[key] = {"error": f"timeout after {args.timeout:.0f} s"}
            print(f"{key}: {time.perf_counter() - start:.0f} s", flush=True)
            write_results("scaling", {"threads": args.threads, "results": results}, table(results), args.tag)
    print(table(results))


if __name__ == "__main__":
    main()
