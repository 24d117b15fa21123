"""Random architectures from a small grammar, for the fuzzer (tests/test_fuzz.py, bench/fuzz.py).

A model is a stem conv, a chain of blocks on ``(N, C, 8, 8)`` feature maps, and a head. Blocks:
conv (k×k, grouped or depthwise, optional BN and ReLU), residual, concat, split, attention
(q/k/v/o projections with head reshapes) and a token MLP (permute → linear → GELU → linear).
Heads: global average pool → linear, or flatten (reshape) → linear. Each block records its spec,
so a failing example prints as a readable architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZE = 8
BLOCKS = ("conv", "residual", "concat", "split", "attention", "mlp")


@dataclass(frozen=True)
class BlockSpec:
    kind: str
    width: int = 4
    kernel: int = 1
    groups: str = "none"  # "none", "grouped", "depthwise"
    bn: bool = True
    relu: bool = True
    heads: int = 1


def _conv(cin: int, cout: int, kernel: int, groups: int, bn: bool, relu: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=not bn)]
    layers += [nn.BatchNorm2d(cout)] if bn else []
    layers += [nn.ReLU()] if relu else []
    return nn.Sequential(*layers)


def _groups(spec: BlockSpec, cin: int) -> tuple[int, int]:
    """(groups, out channels) that satisfy the conv's divisibility rules for ``spec``."""
    if spec.groups == "depthwise":
        return cin, cin * max(1, spec.width // cin)
    if spec.groups == "grouped":
        groups = math.gcd(cin, spec.width)
        if groups > 1:
            return groups, spec.width
    return 1, spec.width


class ConvBlock(nn.Module):
    def __init__(self, spec: BlockSpec, cin: int):
        super().__init__()
        groups, self.out_channels = _groups(spec, cin)
        self.body = _conv(cin, self.out_channels, spec.kernel, groups, spec.bn, spec.relu)

    def forward(self, x):
        return self.body(x)


class Residual(nn.Module):
    def __init__(self, spec: BlockSpec, cin: int):
        super().__init__()
        self.out_channels = cin
        self.inner = _conv(cin, spec.width, spec.kernel, 1, spec.bn, True)
        self.project = _conv(spec.width, cin, 1, 1, spec.bn, False)

    def forward(self, x):
        return F.relu(x + self.project(self.inner(x)))


class Concat(nn.Module):
    def __init__(self, spec: BlockSpec, cin: int):
        super().__init__()
        self.a = _conv(cin, spec.width, spec.kernel, 1, spec.bn, spec.relu)
        self.b = _conv(cin, cin, 1, 1, False, False)
        self.out_channels = spec.width + cin

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Split(nn.Module):
    def __init__(self, spec: BlockSpec, cin: int):
        super().__init__()
        self.first = cin // 2
        self.conv = _conv(self.first, spec.width, spec.kernel, 1, spec.bn, spec.relu)
        self.out_channels = spec.width + cin - self.first

    def forward(self, x):
        p, q = x.split([self.first, x.shape[1] - self.first], dim=1)
        return torch.cat([self.conv(p), q], dim=1)


class Attention(nn.Module):
    def __init__(self, spec: BlockSpec, cin: int):
        super().__init__()
        self.heads = spec.heads if cin % spec.heads == 0 else 1
        self.q, self.k, self.v, self.o = (nn.Linear(cin, cin) for _ in range(4))
        self.out_channels = cin

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        split = lambda t: t.reshape(n, h * w, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(tokens)), split(self.k(tokens)), split(self.v(tokens)))
        y = self.o(y.transpose(1, 2).reshape(n, h * w, c))
        return x + y.transpose(1, 2).reshape(n, c, h, w)


class TokenMLP(nn.Module):
    def __init__(self, spec: BlockSpec, cin: int):
        super().__init__()
        self.up, self.down = nn.Linear(cin, spec.width), nn.Linear(spec.width, cin)
        self.out_channels = cin

    def forward(self, x):
        y = self.down(F.gelu(self.up(x.permute(0, 2, 3, 1))))
        return x + y.permute(0, 3, 1, 2)


_BLOCK_TYPES = {"conv": ConvBlock, "residual": Residual, "concat": Concat, "split": Split,
                "attention": Attention, "mlp": TokenMLP}


class RandomNet(nn.Module):
    def __init__(self, stem_width: int, blocks: list[BlockSpec], flatten_head: bool, classes: int = 5):
        super().__init__()
        self.specs = blocks
        self.stem = _conv(3, stem_width, 3, 1, True, True)
        channels, body = stem_width, []
        for spec in blocks:
            block = _BLOCK_TYPES[spec.kind](spec, channels)
            body.append(block)
            channels = block.out_channels
        self.body = nn.Sequential(*body)
        self.flatten_head = flatten_head
        self.head = nn.Linear(channels * SIZE * SIZE if flatten_head else channels, classes)

    def forward(self, x):
        y = self.body(self.stem(x))
        return self.head(y.flatten(1) if self.flatten_head else y.mean(dim=(2, 3)))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (so folding and pruning see non-trivial values); eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) - 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def example(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
