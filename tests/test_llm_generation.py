"""Compressed causal LMs as their own model class: int8 / low-rank / pruned+int8 graphs applied back onto the
module (fxcompress.layers in place of the rewritten Linear/Conv1D) generate with the KV cache exactly as
the graph computes, save and reload; generation_fidelity measures how a lossy model decodes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxcompress
from fxcompress import apply_to_model, generation_fidelity
from fxcompress.capture import capture
from fxcompress.errors import FxCompressWarning, InvalidInputError
from fxcompress.layers import Int8Embedding, Int8Linear, LowRankLinear, TiedInt8Linear
from fxcompress.manager import PassManager
from fxcompress.pass_base import PassContext
from fxcompress.passes import Int8, LowRank, PruneChannels
from tests import llm_zoo

# per-token W8A8 (int_mm): a decode step quantizes its token as the full-sequence graph does, so the
# cached steps can be compared with the graph tightly (a per-tensor engine depends on the other tokens)
INT8 = dict(min_weight_numel=0, tune=False, impl="int_mm", allow_slower=True)
PIPELINES = {
    "int8": lambda: [Int8(**INT8)],
    "low_rank": lambda: [LowRank(rank=0.25)],
    "prune+int8": lambda: [PruneChannels(ratio=0.5), Int8(**INT8)],
    "int8+embeddings": lambda: [Int8(**INT8, embeddings=True)],
    "prune": lambda: [PruneChannels(ratio=0.5)],
    "prune layer 0": lambda: [PruneChannels(ratio=0.5, ignore=("model.layers.1",))],  # layers of different widths
}


@pytest.fixture(scope="module")
def compressed():
    """(family, pipeline) -> (model, inputs, optimized graph); each family captured once."""
    graphs, cache = {}, {}

    def get(family: str, pipeline: str):
        if family not in graphs:
            model, inputs = llm_zoo.build(family), llm_zoo.tokens()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FxCompressWarning)
                graphs[family] = (model, inputs, capture(model, inputs))
        if (family, pipeline) not in cache:
            model, inputs, graph = graphs[family]
            gm = copy.deepcopy(graph)
            PassManager(PIPELINES[pipeline]()).run(gm, PassContext((), inputs))
            cache[family, pipeline] = (model, inputs, gm)
        return cache[family, pipeline]

    return get


def logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs).logits


def applied(gm, model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)  # GPT-2 pruned heads: the config cannot describe them
        return apply_to_model(gm, model)


@pytest.mark.parametrize("pipeline", ["int8", "low_rank", "prune+int8"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_applied_module_generates_with_its_kv_cache_as_the_graph_computes(compressed, family, pipeline):
    model, inputs, gm = compressed(family, pipeline)
    module = applied(gm, model)
    kinds = {type(m) for m in module.modules()}
    assert (Int8Linear if "int8" in pipeline else LowRankLinear) in kinds, "the rewritten layers were replaced"
    assert not any(isinstance(m, (Int8Linear, LowRankLinear)) for m in model.modules()), "the user's model is untouched"
    assert getattr(model.config, "quantization_config", None) is None
    for batch in (inputs, llm_zoo.tokens(batch=1, length=5, seed=3)):
        torch.testing.assert_close(logits(module, batch), logits(gm, batch), rtol=1e-5, atol=1e-5)
    prompt = inputs["input_ids"][:1, :4]
    with torch.no_grad():
        out = module.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    for step, step_logits in enumerate(out.logits):  # each cached decode step = the graph on the whole prefix
        prefix = out.sequences[:, : prompt.shape[1] + step]
        torch.testing.assert_close(step_logits, logits(gm, {"input_ids": prefix})[:, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,pipeline", [("llama", "int8"), ("llama", "low_rank"), ("qwen2", "prune+int8"), ("gpt2", "int8")])
def test_save_pretrained_and_load_pretrained_rebuild_the_compressed_layers(compressed, family, pipeline, tmp_path):
    model, inputs, gm = compressed(family, pipeline)
    module = applied(gm, model)
    module.save_pretrained(tmp_path)
    reloaded = fxcompress.load_pretrained(type(model), tmp_path)
    assert [type(m) for m in reloaded.modules()] == [type(m) for m in module.modules()]
    torch.testing.assert_close(logits(reloaded, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)
    prompt = inputs["input_ids"][:1, :4]
    assert torch.equal(fxcompress.generation.greedy_tokens(reloaded, prompt, 10), fxcompress.generation.greedy_tokens(module, prompt, 10))


@pytest.mark.parametrize("family,pipeline", [("llama", "prune layer 0"), ("gpt2", "prune")])
def test_pruned_sizes_the_config_cannot_hold_are_rebuilt_by_load_pretrained(compressed, family, pipeline, tmp_path):
    """Layers of different widths (Llama with one layer pruned), GPT-2 attention narrower than n_embd: the
    resized projections are listed for the loader, which builds them and refits the attention's head counts."""
    model, inputs, gm = compressed(family, pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxCompressWarning)
        module = apply_to_model(gm, model)
    resized = {path for path, spec in module.config.quantization_config.layers.items() if spec["kind"] in ("linear", "conv1d")}
    assert resized and all(module.get_submodule(p).weight.shape != model.get_submodule(p).weight.shape for p in resized)
    module.save_pretrained(tmp_path)
    reloaded = fxcompress.load_pretrained(type(model), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)
    prompt = inputs["input_ids"][:1, :4]
    assert torch.equal(fxcompress.generation.greedy_tokens(reloaded, prompt, 8), fxcompress.generation.greedy_tokens(module, prompt, 8))


def test_pruned_shared_expert_width_goes_into_its_config_field_and_reloads(tmp_path):
    torch.manual_seed(0)
    model, inputs = llm_zoo.qwen2_moe().eval(), llm_zoo.tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        gm = capture(model, inputs)
    PassManager([PruneChannels(ratio=0.5, scope="local")]).run(gm, PassContext((), inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxCompressWarning)  # every pruned width fits one config field
        module = apply_to_model(gm, model)
    width = module.model.layers[0].mlp.shared_expert.up_proj.out_features
    assert width < model.config.shared_expert_intermediate_size == 32
    assert module.config.shared_expert_intermediate_size == width
    module.save_pretrained(tmp_path)
    reloaded = fxcompress.load_pretrained(type(model), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)


def test_low_rank_layers_fine_tune_with_autograd(compressed):
    model, inputs, gm = compressed("llama", "low_rank")
    module = applied(gm, model).train()
    module(**inputs, labels=inputs["input_ids"]).loss.backward()
    factors = [m for m in module.modules() if isinstance(m, LowRankLinear)]
    assert factors and all(stage.weight.grad is not None and stage.weight.grad.abs().sum() > 0 for stage in factors[0])


class OwnProjection(torch.nn.Module):
    """A projection that is not an nn.Linear: its module cannot be swapped for an fxcompress layer."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * 2


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_tied_embedding_and_head_stay_one_tensor_when_applied(compressed, family):
    model, inputs, gm = compressed(family, "prune")
    module = applied(gm, model)
    head, table = module.get_output_embeddings().weight, module.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert head is table, "tied weights were copied apart: twice the bytes, and fine-tuning would untie them"
    torch.testing.assert_close(logits(module, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)


def test_a_rewritten_module_that_is_not_a_linear_is_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), OwnProjection()).eval()
    gm = fxcompress.optimize(model, (torch.randn(4, 16),), passes=[Int8(**INT8)], report=False)
    with pytest.raises(InvalidInputError, match=r"1 \(OwnProjection\).*nn.Linear"):
        apply_to_model(gm, model)


def test_generation_fidelity_of_identical_lossy_and_broken_models(compressed):
    model, inputs, gm = compressed("llama", "int8")
    prompts = inputs["input_ids"][:, :4]
    same = generation_fidelity(model, copy.deepcopy(model), prompts, new_tokens=6)
    assert (same.greedy_match, same.prefix_match, same.top1_agreement, same.kl) == (1.0, 1.0, 1.0, 0.0)
    graph_vs_module = generation_fidelity(gm, applied(gm, model), prompts, new_tokens=6)  # the graph decodes without cache
    assert graph_vs_module.greedy_match == 1.0 and graph_vs_module.kl < 1e-6
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight.neg_()
    worst = generation_fidelity(model, broken, prompts, new_tokens=6)
    assert worst.top1_agreement < 0.5 and worst.kl > 0.01 and worst.greedy_match < 0.5
    lossy = generation_fidelity(model, gm, prompts, new_tokens=6)
    assert 0.0 <= lossy.greedy_match <= 1.0 and 0.0 <= lossy.kl < worst.kl
    with pytest.raises(InvalidInputError, match="new_tokens"):
        generation_fidelity(model, gm, prompts, new_tokens=0)


def weight_bytes(module) -> int:
    tensors = {t.data_ptr(): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("llama", False), ("gpt2", True)])
def test_int8_embeddings_keep_a_tied_head_tied_save_reload_and_generate(compressed, family, tied, tmp_path):
    model, inputs, gm = compressed(family, "int8+embeddings")
    assert not any(n.target is torch.ops.aten.embedding.default for n in gm.graph.nodes)
    module = applied(gm, model)
    assert isinstance(module.get_input_embeddings(), Int8Embedding)
    assert isinstance(module.get_output_embeddings(), TiedInt8Linear) is tied
    if tied:  # one int8 table, read by both
        assert module.get_output_embeddings().weight_q is module.get_input_embeddings().weight_q
    state = module.state_dict()
    assert not any(v.is_floating_point() and v.dim() == 2 for v in state.values()), "no float matrix is left"
    # int8 + fp32 row scales: 1/4 of the bytes plus 4 bytes per row of width 32..64 (tiny model), norms stay fp32
    assert weight_bytes(module) < 0.3 * weight_bytes(model)
    torch.testing.assert_close(logits(module, inputs), logits(gm, inputs), rtol=1e-5, atol=1e-5)
    fidelity = generation_fidelity(model, module, inputs["input_ids"][:, :4], new_tokens=8)
    assert fidelity.kl < 1e-3 and fidelity.top1_agreement >= 0.75
    module.save_pretrained(tmp_path)
    reloaded = fxcompress.load_pretrained(type(model), tmp_path)
    assert isinstance(reloaded.get_output_embeddings(), TiedInt8Linear) is tied
    prompt = inputs["input_ids"][:1, :4]
    tokens = fxcompress.generation.greedy_tokens(module, prompt, 8)  # generate with the KV cache
    assert torch.equal(tokens, fxcompress.generation.greedy_tokens(gm, prompt, 8))  # the graph, whole prefix per token
    assert torch.equal(fxcompress.generation.greedy_tokens(reloaded, prompt, 8), tokens)


def test_int8_embedding_of_a_table_still_read_in_float_is_skipped_with_the_reason():
    model, inputs = llm_zoo.build("gpt2"), llm_zoo.tokens()  # wte is tied to the LM head, wpe is not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        gm = capture(model, inputs)
    result = PassManager([Int8(**INT8, embeddings=True, skip=("lm_head",))]).run(gm, PassContext((), inputs))[0].result
    assert "an int8 copy would add bytes" in dict(result.skipped)["transformer.wte"]
    assert "transformer.wpe" in result.rewritten
    tables = [n.args[0].target for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert tables == ["lm_head.weight"], "the tied table stays float, once"
