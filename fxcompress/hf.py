"""Hugging Face specifics of capture: causal LMs are captured without their KV cache.

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
