"""Example models the package ships, used by the README demo, the CLI and the benchmarks.

Plain PyTorch (no torchvision/transformers needed): a ResNet-style CNN, a MobileNetV2-style CNN
and a BERT-style transformer encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-18-shaped (4 stages of 2 basic blocks) with configurable width; ``stem_kernel=7,
    stem_stride=2`` and ``width=64`` give torchvision's ResNet-18 convolutions (without its max-pool)."""

    def __init__(self, num_classes: int = 10, width: int = 32, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 stem_kernel: int = 3, stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, stem_kernel, stem_stride, stem_kernel // 2, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(c_in, c_out, stride=2 if (j == 0 and i > 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.layers(self.stem(x))), 1)))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetSmall(nn.Module):
    """MobileNetV2-shaped: inverted residuals with depthwise convs."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        settings = [(width, 1, 1), (width * 2, 2, 4), (width * 2, 1, 4), (width * 4, 2, 4), (width * 4, 1, 4)]
        layers, c_in = [nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())], width
        for c_out, stride, expand in settings:
            layers.append(InvertedResidual(c_in, c_out, stride, expand))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 1000
    hidden: int = 128
    heads: int = 4
    layers: int = 2
    intermediate: int = 512
    max_positions: int = 512
    dropout: float = 0.1


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        context = F.scaled_dot_product_attention(q, k, v)
        batch, _, seq, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.intermediate), nn.GELU(), nn.Linear(cfg.intermediate, cfg.hidden))
        self.norm2 = nn.LayerNorm(cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class TransformerEncoder(nn.Module):
    """BERT-style encoder over token ids; returns ``{"last_hidden_state", "pooled"}``."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.positions = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.tokens(input_ids) + self.positions(positions))
        for layer in self.layers:
            x = layer(x)
        return {"last_hidden_state": x, "pooled": torch.tanh(self.pooler(x[:, 0]))}


def resnet_small(num_classes: int = 10) -> ResNetSmall:
    return ResNetSmall(num_classes).eval()


def mobilenet_small(num_classes: int = 10) -> MobileNetSmall:
    return MobileNetSmall(num_classes).eval()


def transformer_small() -> TransformerEncoder:
    return TransformerEncoder(EncoderConfig()).eval()


def bert_base_like(layers: int = 4) -> TransformerEncoder:
    """Hidden 768, 12 heads, intermediate 3072 (BERT-base widths) with ``layers`` layers."""
    return TransformerEncoder(EncoderConfig(vocab_size=30522, hidden=768, heads=12, layers=layers, intermediate=3072)).eval()


def image_batch(batch: int = 8, size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def token_batch(batch: int = 8, seq: int = 64, vocab_size: int = 1000) -> tuple[torch.Tensor]:
    return (torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)),)


def init_batch_norm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial running stats and affine params, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


EXAMPLES = {
    "resnet": (lambda: init_batch_norm_statistics(resnet_small()), lambda: image_batch(8, 32)),
    "mobilenet": (lambda: init_batch_norm_statistics(mobilenet_small()), lambda: image_batch(8, 32)),
    "transformer": (transformer_small, lambda: token_batch(8, 64)),
}
"""Name -> (model factory, example-inputs factory) for the demo and benchmarks."""
