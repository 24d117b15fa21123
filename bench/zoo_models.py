"""The public model zoos the zoo runner (``bench/run_zoo.py``) takes through every pass variant.

``zoo(family)`` -> {model name: ZooModel}. Every model is built from its constructor or config with
random weights (nothing is downloaded), at a small input where the model allows it, batch 2:

- ``torchvision-classification`` / ``torchvision-segmentation``: every model torchvision lists.
- ``timm``: one or two constructors per main timm family.
- ``hf``: the Hugging Face architectures of PyTorch's dynamo benchmark list
  (``benchmarks/dynamo/huggingface_models_list.txt``) that build from a config, shrunk to 2 layers.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

BATCH = 2
SMALL_SIDE = 64


@dataclass(frozen=True)
class ZooModel:
    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], Any]  # a tuple of positional inputs or a dict of keyword inputs
    note: str = ""  # why the input is not the small default


def import_torchvision():
    """``torchvision`` with its model constructors only: a torchvision wheel whose C extension does not
    match the installed torch fails on import while registering fake kernels for its detection ops
    (``torchvision::nms`` does not exist); the classification/segmentation models never call them."""
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision


def images(side: int, batch: int = BATCH) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(side)),)


# torchvision models whose architecture fixes or bounds the input size
TORCHVISION_SIDE = {
    "inception_v3": (96, "needs >= 75 px"),
    "googlenet": (64, ""),
    "maxvit_t": (224, "7x7 window partitions at every stage: 224 px"),
}
TORCHVISION_KWARGS = {"inception_v3": {"aux_logits": False, "init_weights": False}, "googlenet": {"aux_logits": False, "init_weights": False}}


def _vit_side(name: str) -> int:
    patch = int(name.rsplit("_", 1)[-1])
    return 4 * patch  # a 4x4 patch grid (the position table is built for this image_size)


def torchvision_zoo(module_name: str) -> dict[str, ZooModel]:
    tvm = import_torchvision().models
    module = tvm if module_name == "classification" else getattr(tvm, module_name)
    family = f"torchvision-{module_name}"
    side_default = SMALL_SIDE if module_name == "classification" else 96
    models = {}
    for name in tvm.list_models(module=module):
        kwargs = {"weights": None, **TORCHVISION_KWARGS.get(name, {})}
        if module_name == "segmentation":
            kwargs["weights_backbone"] = None
        side, note = TORCHVISION_SIDE.get(name, (side_default, ""))
        if name.startswith("vit_"):
            side, note = _vit_side(name), "image_size set to a 4x4 patch grid"
            kwargs["image_size"] = side
        models[name] = ZooModel(family, _tv_builder(name, kwargs), images(side), note)
    return models


def _tv_builder(name: str, kwargs: dict) -> Callable[[], torch.nn.Module]:
    def build():
        return import_torchvision().models.get_model(name, **kwargs)
    return build


# timm: (constructor, side, extra kwargs); one or two per main family
TIMM = {
    "resnet18": (64, {}), "resnet50d": (64, {}), "resnext50_32x4d": (64, {}), "seresnet50": (64, {}),
    "efficientnet_b0": (64, {}), "tf_efficientnetv2_b0": (64, {}), "mobilenetv3_large_100": (64, {}),
    "mobilenetv4_conv_small": (64, {}), "ghostnet_100": (64, {}), "rexnet_100": (64, {}), "regnety_008": (64, {}),
    "densenet121": (64, {}), "dla34": (64, {}), "cspdarknet53": (64, {}), "repvgg_a2": (64, {}), "hrnet_w18_small": (64, {}),
    "convnext_atto": (64, {}), "convnextv2_atto": (64, {}), "edgenext_xx_small": (64, {}), "fastvit_t8": (64, {}),
    "poolformer_s12": (64, {}), "caformer_s18": (64, {}), "mobilevit_xxs": (64, {}), "efficientformer_l1": (224, {}),
    "vit_tiny_patch16_224": (64, {"img_size": 64}), "deit_tiny_patch16_224": (64, {"img_size": 64}),
    "eva02_tiny_patch14_224": (56, {"img_size": 56}), "beit_base_patch16_224": (64, {"img_size": 64}),
    "swin_tiny_patch4_window7_224": (224, {}), "swinv2_cr_tiny_ns_224": (224, {}), "maxvit_tiny_tf_224": (224, {}),
    "coatnet_nano_rw_224": (224, {}), "levit_128s": (224, {}), "mixer_b16_224": (64, {"img_size": 64}),
    "inception_v3": (96, {}), "xception41": (64, {}), "nf_resnet26": (64, {}), "dpn68": (64, {}), "res2net50_26w_4s": (64, {}),
}


def timm_zoo() -> dict[str, ZooModel]:
    import_torchvision()
    import timm

    available = set(timm.list_models())
    models = {}
    for name, (side, kwargs) in TIMM.items():
        if name not in available:
            continue
        note = "" if side == SMALL_SIDE else f"{side} px: fixed by the architecture"
        models[name] = ZooModel("timm", _timm_builder(name, kwargs), images(side), note)
    return models


def _timm_builder(name: str, kwargs: dict) -> Callable[[], torch.nn.Module]:
    def build():
        import_torchvision()
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    return build


SMALL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=128)
SEQ2SEQ = dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
               pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
DECODER = dict(SEQ2SEQ, is_decoder=True, is_encoder_decoder=False)

# dynamo benchmark name -> (transformers class, config class, config overrides, needs decoder_input_ids)
HF = {
    "AlbertForMaskedLM": ("AlbertForMaskedLM", "AlbertConfig", dict(SMALL, embedding_size=32), False),
    "BartForCausalLM": ("BartForCausalLM", "BartConfig", DECODER, False),
    "BartForConditionalGeneration": ("BartForConditionalGeneration", "BartConfig", SEQ2SEQ, True),
    "BertForMaskedLM": ("BertForMaskedLM", "BertConfig", SMALL, False),
    "BlenderbotSmallForCausalLM": ("BlenderbotSmallForCausalLM", "BlenderbotSmallConfig", DECODER, False),
    "CamemBert": ("CamembertForMaskedLM", "CamembertConfig", SMALL, False),
    "DebertaV2ForMaskedLM": ("DebertaV2ForMaskedLM", "DebertaV2Config", SMALL, False),
    "DistilBertForMaskedLM": ("DistilBertForMaskedLM", "DistilBertConfig",
                              dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128), False),
    "DistillGPT2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128), False),
    "ElectraForCausalLM": ("ElectraForCausalLM", "ElectraConfig", dict(SMALL, embedding_size=32, is_decoder=True), False),
    "GPT2ForSequenceClassification": ("GPT2ForSequenceClassification", "GPT2Config",
                                      dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128, pad_token_id=0), False),
    "GoogleFnet": ("FNetForMaskedLM", "FNetConfig", SMALL, False),
    "LayoutLMForMaskedLM": ("LayoutLMForMaskedLM", "LayoutLMConfig", SMALL, False),
    "M2M100ForConditionalGeneration": ("M2M100ForConditionalGeneration", "M2M100Config", SEQ2SEQ, True),
    "MBartForCausalLM": ("MBartForCausalLM", "MBartConfig", DECODER, False),
    "MT5ForConditionalGeneration": ("MT5ForConditionalGeneration", "MT5Config",
                                    dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                         decoder_start_token_id=0), True),
    "MegatronBertForCausalLM": ("MegatronBertForCausalLM", "MegatronBertConfig", dict(SMALL, is_decoder=True), False),
    "MobileBertForMaskedLM": ("MobileBertForMaskedLM", "MobileBertConfig",
                              dict(SMALL, embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                                   num_feedforward_networks=2), False),
    "OPTForCausalLM": ("OPTForCausalLM", "OPTConfig", dict(SMALL, ffn_dim=128, word_embed_proj_dim=64), False),
    "PLBartForCausalLM": ("PLBartForCausalLM", "PLBartConfig", DECODER, False),
    "PegasusForCausalLM": ("PegasusForCausalLM", "PegasusConfig", DECODER, False),
    "RobertaForCausalLM": ("RobertaForCausalLM", "RobertaConfig", dict(SMALL, is_decoder=True, pad_token_id=1), False),
    "T5ForConditionalGeneration": ("T5ForConditionalGeneration", "T5Config",
                                   dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                        decoder_start_token_id=0), True),
    "TrOCRForCausalLM": ("TrOCRForCausalLM", "TrOCRConfig",
                         dict(vocab_size=1000, d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128), False),
    "XGLMForCausalLM": ("XGLMForCausalLM", "XGLMConfig",
                        dict(vocab_size=1000, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128), False),
    "XLNetLMHeadModel": ("XLNetLMHeadModel", "XLNetConfig", dict(vocab_size=1000, d_model=64, n_layer=2, n_head=4, d_inner=128), False),
    "YituTechConvBert": ("ConvBertForMaskedLM", "ConvBertConfig", dict(SMALL, embedding_size=64), False),
    "AllenaiLongformerBase": ("LongformerForMaskedLM", "LongformerConfig", dict(SMALL, attention_window=[8, 8], pad_token_id=1), False),
    "LlamaForCausalLM": ("LlamaForCausalLM", "LlamaConfig", dict(SMALL, num_key_value_heads=2), False),
}
SEQUENCE = 16


def hf_zoo() -> dict[str, ZooModel]:
    return {name: ZooModel("hf", _hf_builder(cls, config, overrides), _hf_inputs(seq2seq))
            for name, (cls, config, overrides, seq2seq) in HF.items()}


def _hf_builder(cls_name: str, config_name: str, overrides: dict) -> Callable[[], torch.nn.Module]:
    def build():
        import transformers

        config = getattr(transformers, config_name)(**overrides)
        torch.manual_seed(0)
        return getattr(transformers, cls_name)(config)
    return build


def _hf_inputs(seq2seq: bool) -> Callable[[], dict]:
    def inputs():
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 1000, (BATCH, SEQUENCE), generator=generator)
        if seq2seq:
            return {"input_ids": ids, "decoder_input_ids": ids[:, : SEQUENCE // 2].clone()}
        return {"input_ids": ids}
    return inputs


FAMILIES: dict[str, Callable[[], dict[str, ZooModel]]] = {
    "torchvision-classification": lambda: torchvision_zoo("classification"),
    "torchvision-segmentation": lambda: torchvision_zoo("segmentation"),
    "timm": timm_zoo,
    "hf": hf_zoo,
}


def zoo(families: list[str] | None = None) -> dict[str, ZooModel]:
    """``"<family>/<name>"`` -> model, for every family in ``families`` (default: all)."""
    models = {}
    for family in families or FAMILIES:
        models.update({f"{family}/{name}": entry for name, entry in FAMILIES[family]().items()})
    return models
