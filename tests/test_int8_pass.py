"""The ``int8`` pass: rewrites, fidelity, skips with reasons, calibration, the CPU ops, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.calibrate import calibrate
from fxcompress.errors import InvalidInputError, PassConfigError
from fxcompress.ops.int8_linear import quantize_rows_aten, quantize_weight_per_channel
from fxcompress.models import token_batch, transformer_small
from fxcompress.passes.int8 import Int8
from fxcompress.verify import fidelity

INT8_OPS = {
    torch.ops.fxcompress.int8_linear.default,
    torch.ops.fxcompress.int8_linear_static.default,
    torch.ops.fxcompress.int8_weight_only_linear.default,
    torch.ops.fxcompress.int8_linear_qengine.default,
}
SCHEME_IMPL = {"dynamic": "int_mm", "static": "int_mm", "weight_only": "int8_weight_only"}
aten = torch.ops.aten


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _int8_nodes(gm) -> int:
    return sum(t in INT8_OPS for t in _targets(gm))


def _optimize(model, inputs, **options):
    """The rewrite structure, independent of this machine's timings: the mode's own CPU kernel unless told."""
    options.setdefault("impl", SCHEME_IMPL[options.get("mode", "dynamic")])
    return fxcompress.optimize(model, inputs, passes=[Int8(**options)], report=False)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return transformer_small(), token_batch(4, 32)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_encoder_fidelity_and_custom_ops(encoder, mode):
    model, inputs = encoder
    gm = _optimize(model, inputs, mode=mode, min_weight_numel=0, allow_slower=True, fuse_siblings=False)
    result = gm.report.results["int8"]
    assert _int8_nodes(gm) == 13 and aten.linear.default not in _targets(gm)
    assert fidelity(model(*inputs), gm(*inputs)).cosine > 0.9999
    assert {d["mode"] for d in result.details} == {mode} and len(result.details) == 13
    assert all(0 < d["weight_rel_error"] < 0.01 for d in result.details)


def test_gelu_fused_into_epilogue(encoder):
    model, inputs = encoder
    gm = _optimize(model, inputs, min_weight_numel=0)
    fused = [d["layer"] for d in gm.report.results["int8"].details if d["fused_activation"] == "gelu"]
    assert fused == ["layers.0.mlp.0", "layers.1.mlp.0"]
    assert aten.gelu.default not in _targets(gm)


def test_skip_keeps_layers_in_float(encoder):
    model, inputs = encoder
    gm = _optimize(model, inputs, min_weight_numel=0, skip=["pooler", "layers.0.attention.*"])
    skipped = dict(gm.report.results["int8"].skipped)
    assert set(skipped) == {"pooler", *(f"layers.0.attention.{p}" for p in ("query", "key", "value", "out"))}
    assert all(reason == "kept in float by skip=" for reason in skipped.values())
    assert _targets(gm).count(aten.linear.default) == 5 and _int8_nodes(gm) == 6  # layer 1: q/k/v in one GEMM


def test_small_layers_stay_float_with_reason():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 8)).eval()
    gm = _optimize(model, (torch.randn(16, 256),))
    result = gm.report.results["int8"]
    assert result.rewritten == ["0"]
    (layer, reason), = result.skipped
    assert layer == "2" and "4096 elements < min_weight_numel=65536" in reason
    assert result.details[0]["fused_activation"] == "relu"


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.k3 = nn.Conv2d(3, 32, 3, padding=1)
        self.pointwise = nn.Conv2d(32, 48, 1)

    def forward(self, x):
        return self.pointwise(torch.relu(self.k3(x)))


def test_pointwise_conv_becomes_gemm_and_kxk_conv_is_reported():
    model, inputs = _Convs().eval(), (torch.randn(2, 3, 9, 7),)
    gm = _optimize(model, inputs, min_weight_numel=0)
    result = gm.report.results["int8"]
    assert [d["op"] for d in result.details] == ["conv1x1"] and result.rewritten == ["pointwise"]
    assert result.skipped == [("k3", "3x3 conv stays float (only 1x1 convs run as int8 GEMMs)")]
    assert fidelity(model(*inputs), gm(*inputs)).cosine > 0.9999


def test_static_mode_uses_calibrated_scales(encoder):
    model, inputs = encoder
    scales = calibrate(model, [token_batch(4, 32), token_batch(2, 32)])
    assert len(scales) == 13 and all(s > 0 for _, s in scales)
    gm = _optimize(model, inputs, mode="static", activation_scales=scales, min_weight_numel=0)
    assert _targets(gm).count(torch.ops.fxcompress.int8_linear_static.default) == 9  # q/k/v share one GEMM per layer
    assert fidelity(model(*inputs), gm(*inputs)).cosine > 0.999
    assert dict(scales)["pooler"] == pytest.approx(gm.report.results["int8"].details[-1]["input_scale"])


def test_percentile_calibration_clips_below_minmax(encoder):
    model, inputs = encoder
    minmax = dict(calibrate(model, [inputs]))
    clipped = dict(calibrate(model, [inputs], method="percentile", percentile=99.0))
    assert all(clipped[layer] < minmax[layer] for layer in minmax)


def test_static_layer_without_scale_is_skipped(encoder):
    model, inputs = encoder
    scales = tuple(p for p in calibrate(model, [inputs]) if p[0] != "pooler")
    gm = _optimize(model, inputs, mode="static", activation_scales=scales, min_weight_numel=0)
    assert dict(gm.report.results["int8"].skipped)["pooler"].startswith("no calibrated activation scale")


@pytest.mark.parametrize("options, message", [
    (dict(mode="int4"), "mode must be one of"),
    (dict(skip="pooler"), "skip must be a list"),
    (dict(min_weight_numel=-1), "min_weight_numel"),
    (dict(mode="static"), "fxcompress.calibrate"),
    (dict(mode="static", activation_scales=(("fc", 0.0),)), "finite and > 0"),
])
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(PassConfigError, match=message):
        Int8(**options)


def test_calibrate_rejects_bad_method(encoder):
    with pytest.raises(InvalidInputError, match="method"):
        calibrate(encoder[0], [encoder[1]], method="entropy")


def test_cpu_op_matches_quantized_reference():
    x, w, b = torch.randn(3, 5, 96), torch.randn(40, 96), torch.randn(40)
    w_q, w_scale = quantize_weight_per_channel(w)
    y = torch.ops.fxcompress.int8_linear(x, w_q, w_scale, b, "relu")
    x_q, x_scale = quantize_rows_aten(x.reshape(-1, 96))
    ref = (x_q.double() @ w_q.double().t()) * x_scale.double() * w_scale.double() + b.double()
    assert y.shape == (3, 5, 40)
    torch.testing.assert_close(y.double(), torch.relu(ref).reshape(3, 5, 40), rtol=1e-5, atol=1e-5)
    assert fidelity(torch.nn.functional.linear(x, w, b).relu(), y).cosine > 0.9999


def test_quantize_per_token_op_round_trips():
    x = torch.randn(2, 7, 64)
    q, scale = torch.ops.fxcompress.quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 7, 1)
    torch.testing.assert_close(q.float() * scale, x, rtol=0, atol=scale.max().item() / 2 + 1e-7)


def test_flop_counter_counts_int8_ops(encoder):
    model, inputs = encoder
    gm = fxcompress.optimize(model, inputs, passes=[Int8(min_weight_numel=0, impl="int_mm")], report=fxcompress.ReportConfig(latency=False))
    input_row, int8_row = gm.report.rows
    assert int8_row["macs"] == input_row["macs"] > 0


def test_save_load_round_trip_and_other_batch_size(encoder, tmp_path):
    model, inputs = encoder
    gm = _optimize(model, inputs, min_weight_numel=0)
    fxcompress.save(gm, tmp_path / "int8.pt2")
    loaded = fxcompress.load(tmp_path / "int8.pt2")
    assert _int8_nodes(loaded) == 9
    other = token_batch(3, 32)
    torch.testing.assert_close(loaded(*other), gm(*other))


def test_ops_compile_without_graph_breaks():
    w_q, w_scale = quantize_weight_per_channel(torch.randn(32, 48))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x):
        return torch.ops.fxcompress.int8_linear(x, w_q, w_scale, None, "none") + torch.ops.fxcompress.int8_weight_only_linear(x, w_q, w_scale, None)

    x = torch.randn(4, 48)
    eager = torch.ops.fxcompress.int8_linear(x, w_q, w_scale, None, "none") + torch.ops.fxcompress.int8_weight_only_linear(x, w_q, w_scale, None)
    torch.testing.assert_close(f(x), eager)


def test_transformers_bert_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=500, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 500, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    gm = fxcompress.optimize(model, inputs, passes=[Int8(min_weight_numel=0, skip=["pooler.*"], impl="int_mm")], report=False)
    assert _int8_nodes(gm) == 8  # q/k/v share one GEMM per layer
    assert fidelity(model(**inputs).last_hidden_state, gm(**inputs).last_hidden_state).cosine > 0.9999


def test_sibling_linears_share_one_gemm(encoder):
    model, inputs = encoder
    gm = _optimize(model, inputs, min_weight_numel=0)
    details = gm.report.results["int8"].details
    qkv = [d for d in details if d["layer"].endswith(("query", "key", "value"))]
    assert len(qkv) == 6 and all(d["gemm_group"] == 3 for d in qkv)
    assert _int8_nodes(gm) == 13 - 2 * 2  # per layer q/k/v -> one GEMM
    assert aten.split_with_sizes.default in _targets(gm)
    assert fidelity(model(*inputs), gm(*inputs)).cosine > 0.9999


def test_fp32_weight_only_on_cpu_stays_float_by_the_static_table_unless_allowed(encoder):
    model, inputs = encoder
    gm = _optimize(model, inputs, mode="weight_only", min_weight_numel=0, impl=None, tune=False)
    skipped = gm.report.results["int8"].skipped
    assert _int8_nodes(gm) == 0 and len(skipped) == 13
    assert all(reason.startswith("kept float: static rule") for _, reason in skipped)
    assert {d["impl"] for d in gm.report.results["int8"].details} == {"float"}
    allowed = _optimize(model, inputs, mode="weight_only", min_weight_numel=0, impl=None, tune=False, allow_slower=True)
    assert _int8_nodes(allowed) == 9


def test_bf16_weight_only_uses_int8_weights():
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(torch.bfloat16).eval()
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    gm = _optimize(model, (x,), mode="weight_only", min_weight_numel=0)
    assert _int8_nodes(gm) == 2
    out = gm(x)
    assert out.dtype == torch.bfloat16
    assert fidelity(model(x).float(), out.float()).cosine > 0.999


def test_fp32_weight_only_can_run_bf16_activations_within_the_contract(encoder):
    model, inputs = encoder
    gm = _optimize(model, inputs, mode="weight_only", min_weight_numel=0, impl="int8_weight_only_bf16", fuse_siblings=False)
    assert _targets(gm).count(torch.ops.fxcompress.int8_weight_only_linear_bf16.default) == 13
    details = gm.report.results["int8"].details
    assert all(d["impl"] == "int8_weight_only_bf16" and d["output_rel_error"] < 0.02 for d in details)
    reference = _optimize(model, inputs, mode="weight_only", min_weight_numel=0, fuse_siblings=False)  # float activations
    with torch.no_grad():
        out, exact = gm(*inputs), reference(*inputs)
    leaves, exact_leaves = torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(exact)
    assert all(t.dtype == torch.float32 for t in leaves)
    assert not all(map(torch.equal, leaves, exact_leaves)), "the activations really went through bf16"
    assert fidelity(exact, out).cosine > 0.9999
    module = fxcompress.apply_to_model(gm, model)
    with torch.no_grad():
        torch.testing.assert_close(module(*inputs), out, rtol=1e-5, atol=1e-5)


def test_smoothquant_moves_outliers_into_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    x = torch.randn(64, 256)
    x[:, :4] *= 60.0  # outlier channels, as after LayerNorm in BERT-family models
    plain = _optimize(model, (x,), min_weight_numel=0)
    smooth = _optimize(model, (x,), min_weight_numel=0, smooth_alpha=0.5)
    reference = model(x)
    assert fidelity(reference, smooth(x)).max_abs_err < fidelity(reference, plain(x)).max_abs_err
    assert all(d["smoothed"] for d in smooth.report.results["int8"].details)
    assert aten.mul.Tensor in _targets(smooth)
    with pytest.raises(PassConfigError, match="smooth_alpha needs mode='dynamic'"):
        Int8(mode="weight_only", smooth_alpha=0.5)


def test_one_frozen_config_per_scheme_and_int8_mode_is_an_alias():
    from fxcompress.passes import Int8Dynamic, Int8Static, Int8WeightOnly

    scales = (("fc", 0.1),)
    assert type(Int8()) is Int8Dynamic and Int8() == Int8Dynamic()
    assert Int8(mode="static", activation_scales=scales) == Int8Static(activation_scales=scales)
    assert type(Int8("weight_only")) is Int8WeightOnly and isinstance(Int8WeightOnly(), Int8)
    # another scheme's option at its default is dropped (old Int8(...) calls keep working); set, it is an error
    assert Int8(mode="weight_only", smooth_alpha=None, conv_regions=True) == Int8WeightOnly()
    with pytest.raises(PassConfigError, match="conv_regions needs mode='static'"):
        Int8(conv_regions=False)
    assert not hasattr(Int8WeightOnly(), "fuse_activation")  # fields apply to every mode of their config
    for config in (Int8(gptq=True), Int8Static(activation_scales=scales, conv_regions=False), Int8WeightOnly(skip=("a",))):
        saved = config.config()
        assert saved["pass"] == "int8" and saved["mode"] == config.mode
        assert fxcompress.make_pass(saved.pop("pass"), **saved) == config  # a saved pipeline entry rebuilds it
    assert "only mode='static'" in Int8.options_help() and "conv_regions" in Int8.options_help()
