"""Real-data accuracy target: scikit-learn digits, 50% channel pruning ("prune_channels"), then
distillation from the unpruned model brings test accuracy back within 1.0 point."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import distill_digits  # noqa: E402


def test_pruned_digits_cnn_recovers_accuracy_with_distillation():
    result = distill_digits.run_experiment(method="prune", ratio=0.5, seed=0)
    assert result["pass"] == "prune_channels"
    original, pruned, distilled = result["stages"]
    print({stage["stage"]: round(stage["test_accuracy"], 2) for stage in result["stages"]})
    assert original["test_accuracy"] >= 97.0
    assert pruned["parameters"] < 0.6 * original["parameters"]
    assert distilled["test_accuracy"] >= original["test_accuracy"] - 1.0
