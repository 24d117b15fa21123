"""Accuracy recovery on real data: compress a digits CNN, then distil it from the original.

scikit-learn's digits (1,797 8×8 grey images, shipped with scikit-learn, no download) are split
80/20 (stratified). A small CNN with batch norm is trained, compressed with
``fxcompress.optimize`` (50% channel pruning, or low-rank at 25% rank), and the compressed graph is
distilled from the original on the training split (KL at temperature 4 plus cross-entropy).
Test accuracy is measured at each stage. Results go to ``bench/results/distill_digits.{json,md}``.

    python bench/distill_digits.py                    # --method prune (pass "prune_channels")
    python bench/distill_digits.py --method low_rank  # pass "low_rank", rank=0.25
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from tabulate import tabulate
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxcompress
from fxcompress.report import parameter_count
from fxcompress.distill import distill

from common import machine_info

RESULTS_DIR = Path(__file__).parent / "results"
COMPRESSION = {  # --method -> (pass name, pass options)
    "prune": ("prune_channels", lambda ratio: {"ratio": ratio}),
    "low_rank": ("low_rank", lambda ratio: {"rank": ratio}),
}
DEFAULT_RATIO = {"prune": 0.5, "low_rank": 0.25}


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global average pooling and a linear classifier."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(1, width), block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_split(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """Train/test datasets of (image N×1×8×8 scaled to [0, 1], label)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=seed)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


class RandomShift(Dataset):
    """A view of an image dataset with each image shifted by up to ``pixels`` in each direction
    (zero fill), drawn from torch's RNG: more inputs for the teacher to label during distillation."""

    def __init__(self, images: TensorDataset, pixels: int = 1):
        self.images, self.pixels = images, pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.images[index]
        padded = nn.functional.pad(image, (self.pixels,) * 4)
        top, left = torch.randint(0, 2 * self.pixels + 1, (2,)).tolist()
        return padded[:, top:top + image.shape[1], left:left + image.shape[2]], label


def train_classifier(model: nn.Module, train: TensorDataset, epochs: int, seed: int) -> nn.Module:
    """Plain supervised training (AdamW, cosine schedule) of the uncompressed model."""
    torch.manual_seed(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return (model(x).argmax(-1) == y).float().mean().item() * 100


def compression_pass(method: str, ratio: float) -> fxcompress.Pass:
    """The configured compression pass for ``--method``."""
    pass_name, options = COMPRESSION[method]
    return fxcompress.make_pass(pass_name, **options(ratio))


def compress(model: nn.Module, example: torch.Tensor, compression: fxcompress.Pass) -> torch.fx.GraphModule:
    """``fxcompress.optimize`` with one compression pass."""
    return fxcompress.optimize(model, (example,), passes=[compression], report=False)


def recover(student: nn.Module, teacher: nn.Module, train: TensorDataset, epochs: int, seed: int) -> list[float]:
    """Distil the compressed student from the original, fine-tuning all of its weights (factors
    a pass created included); returns the per-step losses."""
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    _, history = distill(student, teacher, RandomShift(train), epochs=epochs, batch_size=64, loss="kl+ce", alpha=0.7,
                         temperature=4.0, optimizer="adamw", lr=2e-3, schedule="cosine", warmup_steps=10, seed=seed,
                         progress=False)
    return history.loss


def run_experiment(method: str = "prune", ratio: float | None = None, seed: int = 0, train_epochs: int = 20,
                   distill_epochs: int = 20) -> dict:
    """Train → compress → distil; test accuracy (%) and parameter count at each stage."""
    ratio = DEFAULT_RATIO[method] if ratio is None else ratio
    compression = compression_pass(method, ratio)
    train, test = load_digits_split(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    original = train_classifier(DigitsCNN(), train, train_epochs, seed)
    trained_s = time.perf_counter() - started
    compressed = compress(original, train.tensors[0][:8], compression)
    after_compression = accuracy(compressed, test)
    compressed_params = parameter_count(compressed)
    started = time.perf_counter()
    losses = recover(compressed, original, train, distill_epochs, seed)
    return {
        "method": method, "pass": COMPRESSION[method][0], "ratio": ratio, "seed": seed,
        "train_epochs": train_epochs, "distill_epochs": distill_epochs, "distill_steps": len(losses),
        "train_seconds": round(trained_s, 2), "distill_seconds": round(time.perf_counter() - started, 2),
        "train_samples": len(train), "test_samples": len(test),
        "stages": [
            {"stage": "original", "test_accuracy": accuracy(original, test), "parameters": parameter_count(original)},
            {"stage": "compressed", "test_accuracy": after_compression, "parameters": compressed_params},
            {"stage": "compressed + distilled", "test_accuracy": accuracy(compressed, test),
             "parameters": parameter_count(compressed)},
        ],
        "distill_loss_first_last": [losses[0], losses[-1]],
    }


def write_results(results: list[dict], name: str = "distill_digits") -> Path:
    """``bench/results/<name>.json`` and a markdown table ``<name>.md``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_info(), "results": results}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2))
    rows = []
    for result in results:
        baseline = result["stages"][0]["test_accuracy"]
        for stage in result["stages"]:
            rows.append([f"{result['pass']} {result['ratio']}", stage["stage"], f"{stage['test_accuracy']:.2f}",
                         f"{stage['test_accuracy'] - baseline:+.2f}", stage["parameters"]])
    table = tabulate(rows, headers=["compression", "stage", "test acc. (%)", "Δ vs original", "parameters"],
                     tablefmt="github")
    machine = ", ".join(f"{k}: {v}" for k, v in payload["machine"].items())
    text = (f"# Digits: compression and distillation\n\n{table}\n\nTest split: {results[0]['test_samples']} images; "
            f"command: `python bench/distill_digits.py --method {results[0]['method']}`.\n\nMachine: {machine}\n")
    (RESULTS_DIR / f"{name}.md").write_text(text)
    return RESULTS_DIR / f"{name}.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(COMPRESSION), default="prune")
    parser.add_argument("--ratio", type=float, default=None, help="pruning ratio / low-rank fraction")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--distill-epochs", type=int, default=20)
    args = parser.parse_args()
    results = [run_experiment(args.method, args.ratio, seed, distill_epochs=args.distill_epochs) for seed in args.seeds]
    path = write_results(results, f"distill_digits_{args.method}")
    print(path.read_text())


if __name__ == "__main__":
    main()
