"""One module-selector syntax for Int8(skip=), PruneChannels(ignore=), LowRank(include=, ignore=)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.errors import PassConfigError
from fxcompress.passes import Int8, LowRank, PruneChannels
from fxcompress.selectors import check_selectors, first_match, selects


@pytest.mark.parametrize("selector,name,expected", [
    ("pooler", "pooler", True),
    ("pooler", "pooler.dense", True),            # a module selects everything under it
    ("pooler", "pooler_extra.dense", False),     # ... but not a sibling that shares a prefix
    ("pooler*", "pooler.dense", True),
    ("dense", "pooler.dense", False),            # anchored at the root
    ("**.dense", "pooler.dense", True),
    ("**.dense", "encoder.layer.0.output.dense", True),
    ("encoder.layer.*.output.dense", "encoder.layer.11.output.dense", True),
    ("encoder.layer.*.output.dense", "encoder.layer.0.attention.output.dense", False),  # * is one segment
    ("layer?", "layer1.0.conv1", True),
    ("layer?", "layer10", False),
    ("layer[12]", "layer2.conv", True),
    ("layer[!12]", "layer2.conv", False),
    ("layer[!12]", "layer3.conv", True),
    ("a.b", "axb", False),                       # dots are literal
    ("**", "anything.at.all", True),
    ("fc.weight", "fc.weight", True),            # parameter paths work too
])
def test_selector_syntax(selector, name, expected):
    assert selects(selector, name) is expected


def test_first_match_and_validation():
    assert first_match(["x", "pool*", "pooler"], "pooler.dense") == "pool*"
    assert first_match([], "a") is None
    assert check_selectors("pooler", "skip") == ("pooler",)
    for bad in ([1], [""], 3, None):
        with pytest.raises(PassConfigError, match="fxcompress.selectors"):
            check_selectors(bad, "skip")


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.pooler = nn.Sequential(nn.Linear(64, 64))

    def forward(self, x):
        return self.pooler(self.encoder(x))


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return Tower().eval(), torch.randn(4, 64)


@pytest.mark.parametrize("make_pass", [
    lambda s: Int8(min_weight_numel=0, skip=s, impl="int_mm"),  # forced: tiny layers would be kept float
    lambda s: LowRank(rank=0.1, ignore=s),
    lambda s: PruneChannels(ratio=0.5, ignore=s),
], ids=["int8.skip", "low_rank.ignore", "prune.ignore"])
def test_every_pass_reads_selectors_the_same_way(tower, make_pass):
    model, x = tower

    def rewritten(selectors):
        report = fxcompress.optimize(model, x, passes=[make_pass(selectors)], report=False).report
        return next(iter(report.results.values())).rewritten

    assert any(name.startswith("pooler.") for name in rewritten([]))
    kept = rewritten(["pooler"])  # "pooler" selects pooler.0
    assert kept and not any(name.startswith("pooler.") for name in kept)
