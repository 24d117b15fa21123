"""Hugging Face specifics: causal LMs are captured without their KV cache; HF modules' size attributes
follow their tensors' shapes (:func:`fit_module_sizes`, after pruning and when a pruned model is loaded).

A ``transformers`` model whose ``config.use_cache`` is true returns a ``Cache`` object
(``DynamicCache``) with its logits; that object is not a pytree ``torch.export`` can return, and a
cache created inside one call is of no use to a graph that is called again. The capture copy gets
``config.use_cache = False`` (the forward reads it whenever the caller passes no ``use_cache``), so the
graph computes exactly the logits of the default forward and returns ``past_key_values=None``.
"""

from __future__ import annotations

import sys
import warnings

import torch

from .errors import FxCompressWarning


def without_kv_cache(model: torch.nn.Module, *, warn: bool = True) -> torch.nn.Module:
    """Set ``config.use_cache = False`` on ``model`` (a capture copy) and on every submodule's own config
    (T5's decoder stack holds a copy of the model's) if it is on; warn once for a model that generates (a
    causal LM would have returned its cache)."""
    configs = {id(c): c for m in model.modules() if _is_hf_config(c := getattr(m, "config", None)) and getattr(c, "use_cache", False)}
    for submodule_config in configs.values():
        submodule_config.use_cache = False
    config = getattr(model, "config", None)
    if id(config) not in configs:
        return model
    generates = getattr(config, "is_decoder", False) or (hasattr(model, "can_generate") and model.can_generate())
    if warn and generates:  # encoders (BERT) carry use_cache=True for decoder use only: nothing changes for them
        warnings.warn(
            f"fxcompress: {type(model).__name__} is captured with use_cache=False: the graph returns the same "
            "logits without a KV cache (past_key_values=None). Set model.config.use_cache = False first to "
            "silence this.",
            FxCompressWarning, stacklevel=5,  # the user's call (through eval_copy and the @quiet wrapper)
        )
    return model


def cache_hint(exc: BaseException) -> str:
    """Extra advice for a capture failure caused by a returned KV cache (``use_cache=True`` passed explicitly)."""
    if "Cache" not in str(exc):
        return ""
    return " The model returns a KV cache object: pass use_cache=False in the example inputs (or leave it out)."


def _is_hf_config(config) -> bool:
    transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported
    return transformers is not None and isinstance(config, transformers.PretrainedConfig)


def fit_module_sizes(module: torch.nn.Module, heads_from_config: bool = False) -> None:
    """Size attributes that the forward (or repr / save_pretrained) reads, from the tensors' new shapes.

    Attention keeps whole heads: after pruning the head size is the module's and the head count follows
    from the rows; ``heads_from_config`` (a pruned model being loaded) is the other way round where the
    config ties the head size to the hidden size (GPT-2: ``n_embd / n_head``), whose head count it holds."""
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, torch.nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif isinstance(module, torch.nn.LayerNorm) and weight is not None:
        module.normalized_shape = (weight.shape[0],)
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        module.nx, module.nf = weight.shape
    _fit_attention(module, heads_from_config)


def _fit_attention(module: torch.nn.Module, heads_from_config: bool) -> None:
    """HF attention modules: head counts from the projections' rows (whole heads of ``head_dim``)."""
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        return
    if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
        heads, kv_heads = module.q_proj.out_features // head_dim, module.k_proj.out_features // head_dim
    elif hasattr(module, "qkv_proj") and hasattr(module, "num_key_value_heads"):
        return  # Phi-3 slices its fused rows by config head counts: fitted in _fit_config
    elif type(module).__name__ == "Conv1D" or not hasattr(module, "c_attn"):
        return
    else:  # GPT-2: c_attn = q | k | v, split by split_size
        module.split_size = module.embed_dim = output_width(module.c_attn) // 3
        if not heads_from_config:
            module.num_heads = module.embed_dim // head_dim
        elif module.embed_dim // module.num_heads != head_dim:
            unscaled = getattr(module, "scaling", None) == 1.0  # scale_attn_weights=False
            module.head_dim = module.embed_dim // module.num_heads
            if hasattr(module, "scaling") and not unscaled:
                module.scaling = module.head_dim ** -0.5
        return
    if hasattr(module, "num_key_value_groups"):
        module.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(module, name):
            setattr(module, name, value)


def output_width(layer: torch.nn.Module) -> int | None:
    """Output features of a Linear, Conv1D (``nf``) or fxcompress layer."""
    return getattr(layer, "out_features", None) or getattr(layer, "nf", None)
