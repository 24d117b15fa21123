"""The zoo runner's checks (``bench/run_zoo.py``) on a small sample: what the full runs record is real."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import run_zoo  # noqa: E402
import zoo_models  # noqa: E402
import zoo_report  # noqa: E402
from fxcompress.errors import VerificationError  # noqa: E402
from fxcompress.models import ResNetSmall, init_batch_norm_statistics  # noqa: E402


def _one_layer_bert():
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    return transformers.BertModel(config)


SAMPLE = {
    "hf/BertModel": zoo_models.ZooModel("hf", _one_layer_bert, lambda: {"input_ids": torch.randint(0, 100, (2, 8))}),
    "cnn/resnet_small": zoo_models.ZooModel("cnn", lambda: init_batch_norm_statistics(ResNetSmall(width=8, blocks=(1, 1))),
                                            zoo_models.images(16)),
}


@pytest.fixture(scope="module")
def sample_results():
    results = {}
    for key, entry in SAMPLE.items():
        torch.manual_seed(0)
        model, inputs = entry.build().eval(), entry.inputs()
        graph, reference, captured = run_zoo.capture_once(model, inputs)
        results[key] = {"build": {"status": "ok", "params": sum(p.numel() for p in model.parameters())}, "capture": captured,
                        "prune_ratio": run_zoo.run_variant(graph, inputs, reference, "prune_ratio")}
        if key.startswith("cnn/"):  # mask equivalence on HF models: tests/test_prune_channels.py
            results[key][run_zoo.MASK] = run_zoo.mask_equivalence(model, graph, inputs)
    return results


@pytest.mark.parametrize("key", list(SAMPLE))
def test_sample_prunes_verified_with_shapes_kept_and_costs_measured(sample_results, key):
    record = sample_results[key]["prune_ratio"]
    assert record["status"] == "ok"
    assert 0 < record["macs_ratio"] < 0.9, "half the channels pruned must remove MACs"
    assert any("dim 0" in d for d in sample_results[key]["capture"]["dynamic"]), "the batch stays dynamic"
    assert record["second_shape"], "every pass was verified at a second shape"
    assert [p["pass"] for p in record["passes"]] == ["eliminate_identity", "fold_bn", "prune_channels"]
    assert all(p["seconds"] > 0 and p["peak_x_weights"] >= 1 for p in record["passes"])
    mask = sample_results[key].get(run_zoo.MASK)
    assert mask is None or mask["status"] == "ok" and mask["removed_indices"] > 0


def test_table_and_family_summary_count_what_ran(sample_results):
    broken = {"build": {"status": "ok", "params": 1}, "prune_ratio": run_zoo.failure(VerificationError("prune_channels", "select(): index 2 out of range"))}
    results = {**sample_results, "hf/Broken": broken}
    lines = zoo_report.family_summary(results)
    hf = next(line for line in lines if line.startswith("- **hf**"))
    assert "prune_ratio 1/2" in hf
    assert "mask_equivalence 1/1" in next(line for line in lines if line.startswith("- **cnn**"))
    assert "select(): index # out of range" in hf and "Broken" in hf
    assert broken["prune_ratio"]["where"] == "prune_channels"
    assert zoo_report.cell(sample_results["hf/BertModel"]["prune_ratio"]).startswith("ok 0.")


def test_a_crashing_or_hanging_model_costs_only_that_model(tmp_path, monkeypatch):
    """A worker killed by its timeout leaves every unfinished variant marked, with the reason."""
    monkeypatch.setattr(run_zoo, "__file__", str(tmp_path / "hang.py"))
    (tmp_path / "hang.py").write_text("import time\ntime.sleep(60)\n")
    records = run_zoo.run_model("hf/Any", ["default", "int8"], timeout=1, threads=1, max_params=1e9)
    assert {v: r["status"] for v, r in records.items()} == {"build": "timeout", "capture": "timeout", "default": "timeout", "int8": "timeout"}
