"""Decoder-only LMs (Llama, MQA-Llama, Qwen2, Mistral, Phi-3, GPT-2; tiny random configs) through
capture with their default config and every registered pass; attention-aware pruning (KV groups,
fused projections) proven by mask equivalence and by the head structure of the pruned weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxcompress
from fxcompress import apply_to_model, ir
from fxcompress.capture import capture
from fxcompress.errors import FxCompressWarning, InvalidInputError
from fxcompress.manager import PassManager
from fxcompress.pass_base import PassContext
from fxcompress.registry import make_pass, registered_passes
from fxcompress.passes.low_rank import LowRank
from fxcompress.passes.prune_channels import PruneChannels
from tests import llm_zoo
from tests.test_prune_channels import graph_mask_equivalence

FAMILIES = sorted(llm_zoo.FAMILIES)
PASS_OPTIONS = {  # options that make each pass rewrite something on a tiny model
    "prune_channels": dict(ratio=0.5),
    "low_rank": dict(rank=0.25),
    "int8": dict(min_weight_numel=0, tune=False, allow_slower=True),
}


@pytest.fixture(scope="module")
def captured():
    """family -> (model, example inputs, captured graph); each family is captured once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model, inputs = llm_zoo.build(family), llm_zoo.tokens()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FxCompressWarning)
                cache[family] = (model, inputs, capture(model, inputs))
        return cache[family]

    return get


def logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs).logits


def test_default_config_with_kv_cache_is_captured_without_it():
    model = llm_zoo.build("llama")
    assert model.config.use_cache
    inputs = llm_zoo.tokens()
    with pytest.warns(FxCompressWarning, match="use_cache=False"):
        gm = capture(model, inputs)
    assert model.config.use_cache, "the user's model is not mutated"
    out = gm(**inputs)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_a_submodule_with_its_own_config_is_captured_without_kv_cache():
    import transformers

    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    assert model.decoder.config is not model.config and model.decoder.config.use_cache  # T5's decoder stack: a copy
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :3].clone()}
    with pytest.warns(FxCompressWarning, match="use_cache=False"):
        gm = capture(model, inputs)
    assert model.decoder.config.use_cache, "the user's model is not mutated"
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_explicit_use_cache_true_names_the_fix():
    from fxcompress.errors import CaptureError

    model = llm_zoo.build("gpt2")
    with pytest.raises(CaptureError, match="pass use_cache=False"):
        capture(model, {**llm_zoo.tokens(), "use_cache": True})


@pytest.mark.parametrize("pass_name", sorted(registered_passes()))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_pass_on_every_family(captured, family, pass_name):
    model, inputs, graph = captured(family)
    gm = copy.deepcopy(graph)
    the_pass = make_pass(pass_name, **PASS_OPTIONS.get(pass_name, {}))
    records = PassManager([the_pass]).run(gm, PassContext((), inputs))  # verified: structure, shapes, lossless error
    if pass_name in PASS_OPTIONS:
        assert records[0].result.changed, records[0].result.summary()
    assert logits(gm, inputs).shape == logits(model, inputs).shape
    shapes = [llm_zoo.tokens(batch=3, seed=1)]
    if not isinstance(next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[1], int):
        shapes.append(llm_zoo.tokens(batch=2, length=5, seed=2))  # the sequence length is dynamic
    for other in shapes:
        got, expected = logits(gm, other), logits(model, other)
        assert got.shape == expected.shape and torch.isfinite(got).all()
        if the_pass.lossless:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_is_mask_equivalent(captured, family):
    _, inputs, graph = captured(family)
    error, n_removed = graph_mask_equivalence(graph, PassContext((), inputs), ratio=0.5)
    assert n_removed > 0
    assert error < 1e-4


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of ``original``'s rows that survive in ``pruned`` (random weights: rows are unique)."""
    distance = torch.cdist(pruned.float(), original.float())
    return [int(i) for i in distance.argmin(1)]


def kept_heads(rows: list[int], head_dim: int, first_row: int = 0) -> list[int]:
    """Head indices of kept rows; fails on a split head."""
    heads = sorted({(r - first_row) // head_dim for r in rows})
    assert sorted(r - first_row for r in rows) == [h * head_dim + d for h in heads for d in range(head_dim)], "split head"
    return heads


ATTENTION = {  # family -> (q rows, k rows, v rows) of layer 0's projections as (attribute, first row)
    "llama": ("model.layers.0.self_attn.{}_proj.weight", None),
    "mqa": ("model.layers.0.self_attn.{}_proj.weight", None),
    "qwen2": ("model.layers.0.self_attn.{}_proj.weight", None),
    "mistral": ("model.layers.0.self_attn.{}_proj.weight", None),
    "phi3": (None, "model.layers.0.self_attn.qkv_proj.weight"),
}


def attention_heads(model, gm, family) -> tuple[list[int], list[int], list[int]]:
    """Kept query, key and value heads of layer 0."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    separate, fused = ATTENTION[family]
    if separate:
        names = {p: separate.format(p) for p in "qkv"}
        rows = {p: kept_rows(ir.get_attr(model, names[p]), ir.get_attr(gm, names[p])) for p in "qkv"}
        return tuple(kept_heads(rows[p], head_dim) for p in "qkv")
    rows = kept_rows(ir.get_attr(model, fused), ir.get_attr(gm, fused))
    bounds = [0, heads * head_dim, (heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim]
    parts = [[r for r in rows if lo <= r < hi] for lo, hi in zip(bounds, bounds[1:])]
    return tuple(kept_heads(part, head_dim, lo) for part, lo in zip(parts, bounds))


@pytest.mark.parametrize("family", sorted(ATTENTION))
def test_gqa_pruning_keeps_whole_kv_groups(captured, family):
    model, inputs, graph = captured(family)
    gm = copy.deepcopy(graph)
    keep_hidden = PruneChannels(ratio=0.5, ignore=("model.embed_tokens",))  # whole rows stay comparable
    PassManager([keep_hidden]).run(gm, PassContext((), inputs))
    q, k, v = attention_heads(model, gm, family)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    group = heads // kv_heads
    assert len(q) < heads, "query heads were pruned"
    assert k == v, "a key head and its value head go together"
    assert len(q) % len(k) == 0, "num_key_value_groups stays an integer"
    if kv_heads > 1:  # whole groups: a kept KV head keeps all its query heads
        assert q == [kv * group + r for kv in k for r in range(group)]
    else:  # one shared KV head: query heads are pruned, the KV head stays
        assert k == [0]
    assert logits(gm, llm_zoo.tokens(batch=3, seed=1)).shape == (3, 8, llm_zoo.VOCAB)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_query_head_pruning_removes_as_many_query_heads_from_every_kv_group(captured, family, tmp_path):
    """``attention="query_heads"``: every key/value head stays, each group loses the same number of query heads
    (whole heads), the result is mask-equivalent, and the applied model's ``num_key_value_groups`` and HF config
    follow; it saves, reloads with plain ``from_pretrained`` and generates the same tokens."""
    model, inputs, graph = captured(family)
    error, n_removed = graph_mask_equivalence(graph, PassContext((), inputs), ratio=0.5, query_heads=True)
    assert n_removed > 0 and error < 1e-4
    gm = copy.deepcopy(graph)
    PassManager([PruneChannels(ratio=0.5, attention="query_heads", ignore=("model.embed_tokens",))]).run(gm, PassContext((), inputs))
    q, k, v = attention_heads(model, gm, family)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    group = heads // kv_heads
    assert k == v == list(range(kv_heads)), "every key/value head is kept"
    per_group = [sum(1 for h in q if h // group == g) for g in range(kv_heads)]
    assert len(set(per_group)) == 1 and 0 < per_group[0] < group, f"query heads kept per group: {per_group}"
    pruned = apply_to_model(gm, model)
    torch.testing.assert_close(logits(pruned, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)
    assert {layer.self_attn.num_key_value_groups for layer in pruned.model.layers} == {per_group[0]}
    pruned.save_pretrained(tmp_path)
    config = type(model.config).from_pretrained(tmp_path)
    assert (config.num_attention_heads, config.num_key_value_heads) == (len(q), kv_heads)
    prompt = inputs["input_ids"][:1, :4]
    assert torch.equal(generate(type(model).from_pretrained(tmp_path), prompt, 8), generate(pruned, prompt, 8))


def test_gpt2_heads_are_pruned_alike_in_q_k_v_and_the_vocabulary_is_kept(captured):
    model, inputs, graph = captured("gpt2")
    gm = copy.deepcopy(graph)
    PassManager([PruneChannels(ratio=0.5)]).run(gm, PassContext((), inputs))
    weight = "transformer.h.0.attn.c_attn.weight"  # Conv1D: [in, 3 * hidden] columns q | k | v
    columns = kept_rows(ir.get_attr(model, weight).T, ir.get_attr(gm, weight).T)
    parts = [kept_heads([c for c in columns if lo <= c < lo + 32], 8, lo) for lo in (0, 32, 64)]
    assert parts[0] == parts[1] == parts[2] and len(parts[0]) == 2
    assert ir.get_attr(gm, "lm_head.weight").shape == (llm_zoo.VOCAB, 32), "tied embedding / LM head kept whole"


def test_low_rank_and_int8_rewrite_conv1d_projections(captured):
    model, inputs, graph = captured("gpt2")
    conv1d = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    gm = copy.deepcopy(graph)
    result = PassManager([LowRank(rank=0.25)]).run(gm, PassContext((), inputs))[0].result
    assert conv1d <= set(result.rewritten)
    assert not any(n.target is torch.ops.aten.addmm.default for n in gm.graph.nodes)
    row = next(d for d in result.details if d["layer"] == "transformer.h.0.mlp.c_fc")
    assert (row["full_rank"], row["rank"]) == (32, 8)
    gm = copy.deepcopy(graph)
    result = PassManager([make_pass("int8", **PASS_OPTIONS["int8"])]).run(gm, PassContext((), inputs))[0].result
    assert conv1d <= set(result.rewritten)
    torch.testing.assert_close(logits(gm, inputs), logits(model, inputs), rtol=0.05, atol=0.05)


class GroupedQueryAttention(torch.nn.Module):
    """GQA written three ways: repeat_kv (expand + reshape), repeat_interleave, sdpa(enable_gqa=True)."""

    def __init__(self, form: str, dim=32, heads=4, kv_heads=2, head_dim=12):
        super().__init__()
        self.form, self.heads, self.kv_heads, self.head_dim = form, heads, kv_heads, head_dim
        self.q = torch.nn.Linear(dim, heads * head_dim)
        self.k, self.v = (torch.nn.Linear(dim, kv_heads * head_dim) for _ in range(2))
        self.o = torch.nn.Linear(heads * head_dim, dim)
        self.out = torch.nn.Linear(dim, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k, v = (m(x).view(b, n, -1, self.head_dim).transpose(1, 2) for m in (self.k, self.v))
        group = self.heads // self.kv_heads
        if self.form == "repeat_kv":
            k, v = (t[:, :, None].expand(b, self.kv_heads, group, n, self.head_dim).reshape(b, -1, n, self.head_dim) for t in (k, v))
        elif self.form == "repeat_interleave":
            k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=self.form == "enable_gqa")
        return self.out(self.o(y.transpose(1, 2).reshape(b, n, -1)))


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("form", ["repeat_kv", "repeat_interleave", "enable_gqa"])
def test_gqa_forms_prune_mask_equivalently(form, kv_heads):
    model, x = GroupedQueryAttention(form, kv_heads=kv_heads).eval(), torch.randn(2, 5, 32)
    gm = capture(model, (x,))
    error, n_removed = graph_mask_equivalence(gm, PassContext((x,), {}), ratio=0.5)
    assert n_removed > 0 and error < 1e-4
    PassManager([PruneChannels(ratio=0.5)]).run(gm, PassContext((x,), {}))
    q_rows, k_rows = ir.get_attr(gm, "q.weight").shape[0], ir.get_attr(gm, "k.weight").shape[0]
    assert q_rows % 12 == 0 and k_rows % 12 == 0 and (q_rows // 12) % (k_rows // 12) == 0
    assert gm(torch.randn(3, 5, 32)).shape == (3, 5, 3)


class RMSNormMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
        self.weight = torch.nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_rmsnorm_over_pruned_channels_matches_narrow_model():
    """A mean over pruned channels (RMSNorm's mean of squares) is the mean over the kept ones, as in LayerNorm."""
    model, x = RMSNormMLP().eval(), torch.randn(4, 6)
    gm = capture(model, (x,))
    PassManager([PruneChannels(ratio=0.5)]).run(gm, PassContext((x,), {}))
    keep = kept_rows(model.a.weight, ir.get_attr(gm, "a.weight"))
    assert len(keep) == 4
    h = torch.nn.functional.linear(x, model.a.weight[keep], model.a.bias[keep])
    narrow = model.weight[keep] * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(gm(x), torch.nn.functional.linear(narrow, model.b.weight[:, keep], model.b.bias))


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    sequence = prompt
    with torch.no_grad():
        for _ in range(steps):
            following = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, following], 1)
    return sequence


def generate(model, prompt: torch.Tensor, steps: int = 20) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_graph_applied_to_the_model_generates_with_its_kv_cache_and_reloads(captured, family, tmp_path):
    model, inputs, graph = captured(family)
    gm = copy.deepcopy(graph)
    PassManager([PruneChannels(ratio=0.5)]).run(gm, PassContext((), inputs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = apply_to_model(gm, model)
    assert type(pruned) is type(model) and ir.get_attr(model, "lm_head.weight").shape[1] == 32, "the user's model is untouched"
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(logits(pruned, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)
    prompt = inputs["input_ids"][:1, :4]
    tokens = generate(pruned, prompt)
    assert torch.equal(tokens, greedy_without_cache(pruned, prompt, 20))
    assert not any("save_pretrained" in str(w.message) for w in caught)
    if family == "gpt2":  # GPT2Config derives the attention width from n_embd: the loader rebuilds the pruned projections
        pruned.save_pretrained(tmp_path)
        assert torch.equal(generate(fxcompress.load_pretrained(type(model), tmp_path), prompt), tokens)
        return
    pruned.save_pretrained(tmp_path)
    config = type(model.config).from_pretrained(tmp_path)  # scope="local" (default): every layer alike, one size per field
    widths = {_mlp_width(layer.mlp) for layer in pruned.model.layers}
    assert widths == {config.intermediate_size} and config.intermediate_size < model.config.intermediate_size
    groups = {layer.self_attn.num_key_value_groups for layer in pruned.model.layers}
    assert groups == {config.num_attention_heads // config.num_key_value_heads}
    assert config.num_attention_heads < model.config.num_attention_heads
    assert torch.equal(generate(type(model).from_pretrained(tmp_path), prompt), tokens)


def _mlp_width(mlp) -> int:
    return mlp.up_proj.out_features if hasattr(mlp, "up_proj") else mlp.gate_up_proj.out_features // 2


def test_lossless_pipeline_generates_the_original_greedy_tokens():
    import fxcompress

    model, inputs = llm_zoo.build("llama"), llm_zoo.tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        gm = fxcompress.optimize(model, inputs, report=False)
    prompt = inputs["input_ids"][:1, :4]
    assert torch.equal(generate(apply_to_model(gm, model), prompt), generate(model, prompt))


def test_apply_to_model_refuses_a_graph_that_dropped_parameters():
    import fxcompress

    model, x = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval(), torch.randn(2, 3, 8, 8)
    gm = fxcompress.optimize(model, (x,), ["fold_bn"], report=False)
    with pytest.raises(InvalidInputError, match="1.weight"):
        apply_to_model(gm, model)


@pytest.mark.slow  # three passes, each verified, applied back and decoded step by step (~10 s on one idle core)
def test_mixture_of_experts_is_compressed_around_its_router_and_experts_and_generates():
    """Mixtral: attention (and the LM head) are compressed; the router stays float with its reason, the [E, N, K]
    expert weights become int8 grouped GEMMs under int8 and stay float under low_rank (with the reason); the
    result applies back onto the model class and generates."""
    model, inputs = llm_zoo.mixtral().eval(), llm_zoo.tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = capture(model, inputs)
    per_token_int8 = make_pass("int8", **PASS_OPTIONS["int8"], impl="int_mm")  # a cached step quantizes as the graph does
    for the_pass in (per_token_int8, LowRank(rank=0.25), PruneChannels(ratio=0.5)):
        trial = copy.deepcopy(gm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = PassManager([the_pass]).run(trial, PassContext((), inputs))[0].result
        assert result.changed and any("self_attn" in name for name in result.rewritten)
        assert logits(trial, inputs).shape == logits(model, inputs).shape
        if the_pass.name != "prune_channels":  # pruning keeps the channels through the expert op, with a warning
            reasons = dict(result.skipped)
            assert "router" in reasons["model.layers.0.mlp.gate"] and "topk" in reasons["model.layers.0.mlp.gate"]
            if the_pass.name == "int8":
                assert "model.layers.0.mlp.experts.gate_up_proj" in result.rewritten
            else:
                assert "mixture-of-experts" in reasons["model.layers.0.mlp.experts.gate_up_proj"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FxCompressWarning)
            module = apply_to_model(trial, model)
        torch.testing.assert_close(logits(module, inputs), logits(trial, inputs), rtol=1e-5, atol=1e-5)
        prompt = inputs["input_ids"][:1, :4]
        with torch.no_grad():
            out = module.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0)
        for step, step_logits in enumerate(out.logits):  # each cached decode step = the graph on the whole prefix
            prefix = out.sequences[:, : prompt.shape[1] + step]
            torch.testing.assert_close(step_logits, logits(trial, {"input_ids": prefix})[:, -1], rtol=1e-4, atol=1e-4)
