"""int8 mixture-of-experts experts: ``fxcompress::int8_grouped_linear``, the int8 pass's grouped expert GEMM
rewrite (measured engines, the router kept float), apply-back onto the HF experts module, generate, save/load."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxcompress
from fxcompress import apply_to_model, generation_fidelity
from fxcompress.capture import capture
from fxcompress.errors import FxCompressWarning
from fxcompress.expert_layers import Int8ExpertsMixin
from fxcompress.manager import PassManager
from fxcompress.ops.int8_experts import quantize_experts
from fxcompress.pass_base import PassContext
from fxcompress.passes import Int8
from tests import llm_zoo

BUILDERS = {"mixtral": llm_zoo.mixtral, "qwen2_moe": llm_zoo.qwen2_moe}
EXPERTS = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")


@pytest.fixture(scope="module")
def captured():
    graphs = {}

    def get(family: str):
        if family not in graphs:
            torch.manual_seed(0)
            model, inputs = BUILDERS[family]().eval(), llm_zoo.tokens()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graphs[family] = (model, inputs, capture(model, inputs))
        model, inputs, graph = graphs[family]
        return model, inputs, copy.deepcopy(graph)

    return get


def run_int8(gm, inputs, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        return PassManager([Int8(**options)]).run(gm, PassContext((), inputs))[0].result


def logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = module(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def weight_bytes(module) -> int:
    tensors = {t.data_ptr(): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("engine", ["int8_weight_only", "int_mm", "qengine:fbgemm"])
def test_grouped_int8_linear_runs_each_routed_expert_on_its_rows(engine):
    if engine.startswith("qengine:") and engine.removeprefix("qengine:") not in torch.backends.quantized.supported_engines:
        pytest.skip(f"{engine} is not in this PyTorch build")
    weight = torch.randn(4, 24, 16)
    weight_q, weight_scale = quantize_experts(weight)
    x = torch.randn(9, 16)
    offsets = torch.tensor([3, 3, 7, 8], dtype=torch.int32)  # expert 1 has no rows; row 8 is past the last expert
    y = torch.ops.fxcompress.int8_grouped_linear(x, weight_q, weight_scale, offsets, engine, engine, 0)
    dequantized = weight_q.float() * weight_scale[..., None]
    rows_of = {0: slice(0, 3), 2: slice(3, 7), 3: slice(7, 8)}
    for expert, rows in rows_of.items():
        expected = x[rows] @ dequantized[expert].T
        assert (y[rows] - expected).norm() / expected.norm() < (1e-5 if engine == "int8_weight_only" else 0.05)
    assert torch.equal(y[8:], torch.zeros_like(y[8:]))


@pytest.mark.parametrize("family,impl", [("mixtral", None), ("qwen2_moe", "int_mm")])
def test_size_configuration_makes_the_experts_int8_applies_back_generates_and_reloads(captured, family, impl, tmp_path):
    """``allow_slower=True`` + int8 embeddings: every expert weight int8 (per expert, per output channel), the
    router float; ≈0.28x fp32 bytes; the applied HF model = the graph, generates, saves and reloads."""
    model, inputs, gm = captured(family)
    result = run_int8(gm, inputs, min_weight_numel=0, tune=False, allow_slower=True, embeddings=True, impl=impl)
    assert set(EXPERTS) <= set(result.rewritten)
    assert "router" in dict(result.skipped)["model.layers.0.mlp.gate"]
    rows = {row["layer"]: row for row in result.details if row.get("op") == "grouped_linear"}
    assert all(rows[name]["weight_rel_error"] < 0.01 for name in EXPERTS)
    error = ((logits(gm, inputs) - logits(model, inputs)).norm() / logits(model, inputs).norm()).item()
    assert error < 0.03, f"int8 experts: logits relative error {error:.3g}"
    module = apply_to_model(gm, model)
    experts = module.model.layers[0].mlp.experts
    assert isinstance(experts, Int8ExpertsMixin) and isinstance(experts, type(model.model.layers[0].mlp.experts))
    assert set(experts.int8_projections) == {"gate_up_proj", "down_proj"} and not hasattr(experts, "gate_up_proj")
    assert not any(t.is_floating_point() and t.dim() == 3 for t in module.state_dict().values())
    ratio = weight_bytes(module) / weight_bytes(model)
    assert 0.25 < ratio < 0.3, f"weight bytes {ratio:.3f}x fp32"
    torch.testing.assert_close(logits(module, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)
    fidelity = generation_fidelity(model, module, inputs["input_ids"][:, :4], new_tokens=8)
    print(f"{family}: logits rel error {error:.3g}, greedy match {fidelity.greedy_match:.2f}, KL {fidelity.kl:.2g}")
    assert fidelity.kl < 1e-2 and fidelity.top1_agreement >= 0.75
    prompt = inputs["input_ids"][:1, :4]
    tokens = fxcompress.generation.greedy_tokens(module, prompt, 8)  # HF generate with the KV cache
    if impl == "int_mm":  # per-token W8A8: a cached step computes what the graph computes on the whole prefix
        assert torch.equal(tokens, fxcompress.generation.greedy_tokens(gm, prompt, 8))
    module.save_pretrained(tmp_path)
    reloaded = fxcompress.load_pretrained(type(model), tmp_path)
    assert isinstance(reloaded.model.layers[0].mlp.experts, Int8ExpertsMixin)
    assert torch.equal(fxcompress.generation.greedy_tokens(reloaded, prompt, 8), tokens)


def test_expert_engines_are_measured_against_float_at_one_row_and_at_the_example(captured):
    """Default options: float is in the race; with ``decode_rows`` below the example's rows per expert the engine is
    also chosen at one row; a layer that stays float says why, one that does not records both choices."""
    model, inputs, gm = captured("mixtral")
    result = run_int8(gm, inputs, min_weight_numel=0, decode_rows=2, tune_time_s=0.01)
    rows = {row["layer"]: row for row in result.details if row.get("op") == "grouped_linear"}
    skipped = dict(result.skipped)
    for name in EXPERTS:
        assert "float" in rows[name]["timings"] and "decode_timings" in rows[name]
        if name in skipped:
            assert skipped[name].startswith("kept float") and rows[name]["decode_impl"] == "float"
        else:
            assert name in result.rewritten and rows[name]["decode_impl"] != "float"
    torch.testing.assert_close(logits(gm, inputs), logits(model, inputs), rtol=0.05, atol=0.05)


def test_weight_only_experts_match_the_dequantized_weights(captured):
    model, inputs, gm = captured("qwen2_moe")
    result = run_int8(gm, inputs, mode="weight_only", min_weight_numel=0, allow_slower=True, tune=False)
    assert set(EXPERTS) <= set(result.rewritten)
    rows = {row["layer"]: row for row in result.details if row.get("op") == "grouped_linear"}
    assert all(rows[name]["impl"] == "int8_weight_only" and rows[name]["output_rel_error"] < 0.01 for name in EXPERTS)
    module = apply_to_model(gm, model)
    torch.testing.assert_close(logits(module, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)
