"""One small model per family, with valid inputs at several shapes, for the dynamic-shape tests
and ``bench/dynamic_shapes_matrix.py``.

``FAMILIES[name] = (model factory, inputs(batch, size))``; ``size`` is the sequence length or image
side, ``None`` keeps the example's. ``SHAPES[name]`` names the shapes every pass is checked at;
a family whose model fixes its size (ViT: position table) has no "other size" shape.
"""

from __future__ import annotations

import torch

from fxcompress import passes
from fxcompress.models import EncoderConfig, MobileNetSmall, ResNetSmall, TransformerEncoder, init_batch_norm_statistics

EXAMPLE_BATCH, OTHER_BATCH = 2, 3


def _generator(batch: int, size: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * batch + size)


def images(batch: int, size: int | None, default: int = 16) -> tuple:
    size = size or default
    return (torch.randn(batch, 3, size, size, generator=_generator(batch, size)),)


def tokens(batch: int, size: int | None, mask: bool = True, default: int = 12) -> dict:
    size = size or default
    ids = torch.randint(0, 99, (batch, size), generator=_generator(batch, size))
    if not mask:
        return {"input_ids": ids}
    attention = torch.ones(batch, size, dtype=torch.long)
    attention[0, size - size // 4:] = 0  # one padded row: the mask must stay a mask at every shape
    return {"input_ids": ids, "attention_mask": attention}


def _plain_cnn():
    from zoo import PlainCNN

    return init_batch_norm_statistics(PlainCNN()).eval()


def _hf(name: str):
    import transformers as tf

    if name == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    if name == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, use_cache=False, bos_token_id=0, eos_token_id=0))
    if name == "vit":
        return tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64))
    return tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))


FAMILIES = {
    "cnn": (_plain_cnn, images),
    "resnet": (lambda: init_batch_norm_statistics(ResNetSmall(width=8, blocks=(1, 1))).eval(), images),
    "mobilenet": (lambda: init_batch_norm_statistics(MobileNetSmall(width=8)).eval(), images),
    "encoder": (lambda: TransformerEncoder(EncoderConfig(hidden=32, intermediate=64, max_positions=64)).eval(),
                lambda b, s: (tokens(b, s, mask=False)["input_ids"],)),
    "bert": (lambda: _hf("bert").eval(), tokens),
    "gpt2": (lambda: _hf("gpt2").eval(), lambda b, s: tokens(b, s, mask=False)),
    "vit": (lambda: _hf("vit").eval(), lambda b, s: {"pixel_values": images(b, s)[0]}),
    "t5_encoder": (lambda: _hf("t5").eval(), tokens),
}

OTHER_SIZE = {"cnn": 24, "resnet": 24, "mobilenet": 24, "encoder": 7, "bert": 7, "gpt2": 7, "t5_encoder": 7, "vit": None}
"""The other sequence length / image side; None: the model fixes it (ViT's position table)."""


def shapes(family: str) -> dict[str, tuple[int, int | None]]:
    """Shape name -> (batch, size) every compressed model of ``family`` must run at."""
    out = {"example": (EXAMPLE_BATCH, None), "other batch": (OTHER_BATCH, None), "batch 1": (1, None)}
    if OTHER_SIZE[family] is not None:
        out["other size"] = (EXAMPLE_BATCH, OTHER_SIZE[family])
    return out


def pass_under_test(name: str):
    """Each registered pass, configured so it rewrites something even in these small models."""
    return {
        "eliminate_identity": passes.EliminateIdentity(),
        "fold_bn": passes.FoldBN(),
        "prune_channels": passes.PruneChannels(ratio=0.5),
        "low_rank": passes.LowRank(rank=0.25),
        "int8": passes.Int8(min_weight_numel=0, impl="int_mm"),  # forced: the measured choice keeps tiny layers float
    }[name]


PASSES = ("eliminate_identity", "fold_bn", "prune_channels", "low_rank", "int8")


LOSSY_MARGIN, LOSSY_FLOOR = 3.0, 1e-3


def tolerance(lossless: bool, error_at_example: float) -> float:
    """Max relative error vs the original model allowed at another shape: 1e-5 for a lossless pass;
    for a lossy one, the error it has at the example shape with a margin (inputs differ)."""
    return 1e-5 if lossless else max(LOSSY_MARGIN * error_at_example, LOSSY_FLOOR)
