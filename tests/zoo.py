"""Test model zoo for capture and folding: (name, model factory, example inputs factory)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcompress.models import init_batch_norm_statistics, mobilenet_small, resnet_small, transformer_small


def conv_bn(c_in, c_out, k=3, stride=1, groups=1, bias=False, padding_mode="zeros"):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=bias, padding_mode=padding_mode), nn.BatchNorm2d(c_out), nn.ReLU())


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16, bias=True), conv_bn(16, 32, stride=2), nn.MaxPool2d(2), conv_bn(32, 32, padding_mode="reflect"))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class GroupedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 16)
        self.grouped = conv_bn(16, 32, groups=4)
        self.depthwise = conv_bn(32, 32, groups=32, bias=True)
        self.pointwise = conv_bn(32, 24, k=1)

    def forward(self, x):
        return self.pointwise(self.depthwise(self.grouped(self.a(x))))


class InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.b1 = conv_bn(16, 8, k=1)
        self.b3 = nn.Sequential(conv_bn(16, 8, k=1), conv_bn(8, 12))
        self.b5 = nn.Sequential(conv_bn(16, 4, k=1), conv_bn(4, 6, k=5))
        self.pool_proj = conv_bn(16, 6, k=1)
        self.out = conv_bn(32, 16, k=1)

    def forward(self, x):
        x = self.stem(x)
        pooled = self.pool_proj(F.max_pool2d(x, 3, 1, 1))
        return self.out(torch.cat([self.b1(x), self.b3(x), self.b5(x), pooled], dim=1))


class TransformerBlock(nn.Module):
    """nn.MultiheadAttention + LayerNorm + MLP, as in torchvision's ViT encoder block."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn2(self.c2(F.relu(self.bn1(self.c1(x)))))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)

    def forward(self, x):
        return self.bn(self.c(x)).relu()


class ConvTransposeNet(nn.Module):
    """Transposed convs with groups 1, 2 and depthwise, each followed by BN."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.bn1 = nn.BatchNorm2d(12)
        self.up2 = nn.ConvTranspose2d(12, 8, 3, stride=1, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.up3 = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=8)
        self.bn3 = nn.BatchNorm2d(8)
        self.up1d = nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1, groups=2)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.bn3(self.up3(F.relu(self.bn2(self.up2(F.relu(self.bn1(self.up1(x))))))))
        return self.bn1d(self.up1d(y.flatten(2)))


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x))))))


def _bn(model):
    return init_batch_norm_statistics(model).eval()


def img(c=3, size=16, batch=4):
    return lambda: (torch.randn(batch, c, size, size),)


ZOO = {
    "plain_cnn": (lambda: _bn(PlainCNN()), img()),
    "resnet": (lambda: _bn(resnet_small()), img(size=32)),
    "mobilenet": (lambda: _bn(mobilenet_small()), img(size=32)),
    "grouped_cnn": (lambda: _bn(GroupedCNN()), img()),
    "inception": (lambda: _bn(InceptionLike()), img()),
    "transformer_block": (lambda: TransformerBlock().eval(), lambda: (torch.randn(2, 10, 32),)),
    "transformer_encoder": (lambda: transformer_small(), lambda: (torch.randint(0, 1000, (2, 16)),)),
    "conv1d": (lambda: _bn(Conv1dNet()), lambda: (torch.randn(4, 4, 32),)),
    "conv3d": (lambda: _bn(Conv3dNet()), lambda: (torch.randn(2, 2, 6, 6, 6),)),
    "conv_transpose": (lambda: _bn(ConvTransposeNet()), img(c=8, size=4)),
    "linear_bn1d": (lambda: _bn(LinearBN()), lambda: (torch.randn(8, 20),)),
}


def hf_models():
    """Small Hugging Face models built from configs with random weights: name -> (model, kwargs)."""
    transformers = __import__("transformers")
    ids = torch.randint(0, 99, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, use_cache=False))
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    return {
        "bert": (bert.eval(), {"input_ids": ids, "attention_mask": mask}),
        "gpt2": (gpt2.eval(), {"input_ids": ids, "use_cache": False}),
        "vit": (vit.eval(), {"pixel_values": torch.randn(2, 3, 16, 16)}),
        "t5_encoder": (t5.eval(), {"input_ids": ids, "attention_mask": mask}),
    }
