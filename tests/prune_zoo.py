"""Small stand-ins for torchvision / timm / Hugging Face architectures (torchvision is not
installable next to this torch), used by the prune_channels tests and benchmark."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=stride)
        self.conv2 = conv_bn(cout, cout, act=None)
        self.down = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.down(x))


class ResNetLike(nn.Module):
    def __init__(self, widths=(16, 32, 64), num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.pool(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=4, se=False):
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, 1, act=nn.ReLU6)
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV2Like(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2, se=True),
            InvertedResidual(24, 24, 1, se=True), InvertedResidual(24, 32, 2),
        )
        self.head = conv_bn(32, 64, 1, act=nn.ReLU6)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


def channel_shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride > 1 else half
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, half, 1))
        self.branch2 = nn.Sequential(
            conv_bn(branch_in, half, 1), conv_bn(half, half, 3, stride, groups=half, act=None), conv_bn(half, half, 1)
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Like(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2)
        self.stages = nn.Sequential(ShuffleBlock(16, 32, 2), ShuffleBlock(32, 32, 1), ShuffleBlock(32, 64, 2), ShuffleBlock(64, 64, 1))
        self.conv5 = conv_bn(64, 128, 1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.conv5(self.stages(self.stem(x))).mean((2, 3)))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1, self.expand3x3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNetLike(nn.Module):
    """The classifier is a convolution: its output channels are the logits."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(32, 8, 16), Fire(32, 8, 16), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(32, 16, 32),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(64, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class InceptionBlock(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.b1 = conv_bn(cin, 16, 1)
        self.b2 = nn.Sequential(conv_bn(cin, 12, 1), conv_bn(12, 16, 3))
        self.b3 = nn.Sequential(conv_bn(cin, 8, 1), conv_bn(8, 8, 3), conv_bn(8, 8, 3))
        self.b4 = nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(cin, 8, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionLike(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn(3, 24, stride=2)
        self.mixed = nn.Sequential(InceptionBlock(24), InceptionBlock(48))
        self.fc = nn.Linear(48 * 4 * 4, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.mixed(self.stem(x)), 4)
        return self.fc(torch.flatten(x, 1))  # one channel -> 16 features of fc


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = self.conv1(F.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(F.relu(self.norm2(x)))


class DenseNetLike(nn.Module):
    """torchvision DenseNet's pattern: every layer reads the concatenation of all earlier features."""

    def __init__(self, growth=8, layers=(3, 3), num_classes=10):
        super().__init__()
        self.stem, stages, c = conv_bn(3, 16), nn.ModuleList(), 16
        for i, n in enumerate(layers):
            stages.append(nn.ModuleList(DenseLayer(c + k * growth, growth) for k in range(n)))
            c += n * growth
            if i < len(layers) - 1:
                stages.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)))
                c //= 2
        self.stages, self.fc = stages, nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            if isinstance(stage, nn.ModuleList):
                features = [x]
                for layer in stage:
                    features.append(layer(features))
                x = torch.cat(features, 1)
            else:
                x = stage(x)
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


class Attention(nn.Module):
    """timm-style packed qkv attention, optionally with a relative position bias table."""

    def __init__(self, dim, heads, window=None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.window = window
        if window:
            self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
            coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
            rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
            self.register_buffer("bias_index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.window:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            bias = self.bias_table[self.bias_index].view(n, n, -1).permute(2, 0, 1)
            x = (attn + bias.unsqueeze(0)).softmax(-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads, window=None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, window)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTLike(nn.Module):
    def __init__(self, dim=32, heads=4, depth=2, patch=4, image=16, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class WindowBlock(nn.Module):
    """Swin-style: partition into windows, attention with relative position bias, reverse."""

    def __init__(self, dim, heads, window):
        super().__init__()
        self.window = window
        self.block = Block(dim, heads, window)

    def forward(self, x):
        b, h, w, c = x.shape
        s = self.window
        x = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        x = self.block(x)
        return x.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class SwinLike(nn.Module):
    def __init__(self, dim=32, heads=4, window=4, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.norm0 = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(WindowBlock(dim, heads, window), WindowBlock(dim, heads, window))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.norm0(self.patch(x).permute(0, 2, 3, 1))
        return self.head(self.blocks(x).mean((1, 2)))


def hf_bert(hidden=32, layers=2, heads=4):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, vocab_size=100, max_position_embeddings=128)
    return BertModel(config).eval()


def hf_vit(hidden=32, layers=2, heads=4):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, image_size=16, patch_size=4)
    return ViTModel(config).eval()


def image(batch=2, size=32):
    return (torch.randn(batch, 3, size, size),)


def tokens(batch=2, length=8):
    return {"input_ids": torch.randint(0, 100, (batch, length)), "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def zoo() -> dict:
    """name -> (model factory, example-input factory)."""
    return {
        "resnet": (ResNetLike, image),
        "mobilenet_v2": (MobileNetV2Like, image),
        "shufflenet_v2": (ShuffleNetV2Like, image),
        "squeezenet": (SqueezeNetLike, lambda: image(size=48)),
        "inception": (InceptionLike, image),
        "densenet": (DenseNetLike, lambda: image(size=16)),
        "vit": (ViTLike, lambda: image(size=16)),
        "swin": (SwinLike, lambda: image(size=16)),
        "hf_bert": (hf_bert, tokens),
        "hf_vit": (hf_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}),
    }
