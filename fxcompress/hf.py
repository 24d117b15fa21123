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
    """Set ``config.use_cache = False`` on ``model`` (a capture copy) if it is on; warn once for a model that
    generates (a causal LM would have returned its cache)."""
    config = getattr(model, "config", None)
    if not _is_hf_config(config) or not getattr(config, "use_cache", False):
        return model
    config.use_cache = False
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


QUANT_METHOD = "fxcompress"


def register_quantizer() -> None:
    """Teach ``transformers`` the ``quant_method="fxcompress"`` that :func:`fxcompress.apply_to_model` writes
    into the config of a model with int8 / low-rank layers, so ``from_pretrained`` rebuilds those layers
    (from ``quantization_config.layers``) before it loads their tensors. Idempotent."""
    from transformers.quantizers import auto

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @auto.register_quantization_config(QUANT_METHOD)
    class FxCompressConfig(QuantizationConfigMixin):
        """``layers``: module path -> :func:`fxcompress.layers.layer_from_spec` spec."""

        def __init__(self, layers: dict | None = None, **kwargs):
            self.quant_method, self.layers = QUANT_METHOD, dict(layers or {})

    @auto.register_quantizer(QUANT_METHOD)
    class FxCompressQuantizer(HfQuantizer):
        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            from .layers import layer_from_spec

            layers = self.quantization_config.layers
            for path in sorted(layers, key=lambda p: layers[p]["kind"] != "int8_embedding"):  # a tied head needs its table
                parent, _, leaf = path.rpartition(".")
                owner = model.get_submodule(parent)
                setattr(owner, leaf, layer_from_spec(layers[path], model))
                # the parent's weight init (e.g. GPT-2's scaled c_proj init) would reach for `.weight`; all is loaded
                owner._is_hf_initialized = True
            return model

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False  # saved already int8 / factorized

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    globals().update(FxCompressConfig=FxCompressConfig, FxCompressQuantizer=FxCompressQuantizer)


def quantization_config(layers: dict):
    """The ``config.quantization_config`` naming the replaced layers (registers the quantizer)."""
    register_quantizer()
    return FxCompressConfig(layers=layers)  # noqa: F821  (defined by register_quantizer)
