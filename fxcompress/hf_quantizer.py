"""The ``transformers`` quantizer that rebuilds fxcompress layers in ``from_pretrained``.

:func:`fxcompress.apply_to_model` lists the layers it replaced in ``config.quantization_config``
(``quant_method="fxcompress"``); the quantizer registered here builds empty :mod:`fxcompress.layers`
modules of those shapes — and projections resized by pruning where the config cannot describe them —
before the saved tensors load (HF's extension point for layers that are not ``nn.Linear``). ``transformers`` is imported only when a quantizer is registered.
"""

from __future__ import annotations

from .hf import fit_module_sizes

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
            from .expert_layers import empty_int8_experts  # here: layers load the custom ops, import fxcompress stays fast
            from .layers import layer_from_spec

            layers = self.quantization_config.layers
            for path in sorted(layers, key=lambda p: layers[p]["kind"] != "int8_embedding"):  # a tied head needs its table
                parent, _, leaf = path.rpartition(".")
                owner = model.get_submodule(parent)
                if layers[path]["kind"] == "int8_experts":  # the experts module keeps its class, as an int8 subclass
                    empty_int8_experts(owner.get_submodule(leaf), layers[path])._is_hf_initialized = True
                else:
                    setattr(owner, leaf, layer_from_spec(layers[path], model))
                # the parent's weight init (e.g. GPT-2's scaled c_proj init) would reach for `.weight`; all is loaded
                owner._is_hf_initialized = True
            for module in reversed(list(model.modules())):  # resized projections: attention head counts follow
                fit_module_sizes(module, heads_from_config=True)
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
