"""Tiny decoder-only language models from ``transformers`` configs (random weights), one per family
pattern: rotary vs learned positions, GQA / MQA, fused projections, Conv1D, biases, tied heads."""

from __future__ import annotations

import torch

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llama():
    """GQA 4/2, RoPE, SwiGLU, RMSNorm, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=2))


def mqa():
    """One key/value head shared by 4 query heads, head_dim 24 != hidden / heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**COMMON, num_key_value_heads=1, head_dim=24))


def qwen2():
    """GQA with q/k/v biases, tied embedding and LM head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True))


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=16))


def phi3():
    """Fused ``qkv_proj`` (q | k | v rows) and ``gate_up_proj`` (gate | up rows)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**COMMON, num_key_value_heads=2))


def gpt2():
    """Learned positions, LayerNorm, GELU MLP, ``Conv1D`` (addmm with a [in, out] weight), tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))


FAMILIES = {"llama": llama, "mqa": mqa, "qwen2": qwen2, "mistral": mistral, "phi3": phi3, "gpt2": gpt2}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=generator)}


def mixtral():
    """Mixture of experts: a router picks 2 of 4 experts per token; expert weights are [E, N, K] tensors."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**{**COMMON, "num_hidden_layers": 1}, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config)


def qwen2_moe():
    """Qwen-MoE style: 2 of 4 routed experts, a shared expert behind a sigmoid gate, q/k/v biases, two layers
    (the second dense: ``mlp_only_layers``)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(**COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                            shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1])
    return Qwen2MoeForCausalLM(config)
