import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.passes.fold_bn import BATCH_NORMS
from fxcompress.verify import fidelity
from zoo import ZOO


def batch_norm_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BATCH_NORMS]


@pytest.mark.parametrize("name", list(ZOO))
def test_fold_bn_folds_everything_and_is_exact(name):
    make_model, make_inputs = ZOO[name]
    model, inputs = make_model(), make_inputs()
    had_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = fxcompress.optimize(model, inputs, passes=["fold_bn"], report=False)
    assert batch_norm_nodes(out) == []
    result = out.report.results["fold_bn"]
    assert result.skipped == []
    assert bool(result.rewritten) == had_bn
    with torch.no_grad():
        assert fidelity(model(*inputs), out(*inputs)).max_rel_err <= 1e-5


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_bn_grouped_conv_and_conv_transpose(groups, transposed):
    conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    model = nn.Sequential(conv_cls(8, 8, 3, padding=1, groups=groups), nn.BatchNorm2d(8))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.2, 3.0)
    model[1].weight.data.normal_()
    model.eval()
    x = torch.randn(2, 8, 6, 6)
    out = fxcompress.optimize(model, (x,), passes=["fold_bn"], report=False)
    assert batch_norm_nodes(out) == []
    with torch.no_grad():
        assert fidelity(model(x), out(x)).max_rel_err <= 1e-5


class OtherUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class LinearOnSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(5)  # normalises dim 1 = sequence positions, not the linear's features

    def forward(self, x):
        return self.bn(self.fc(x))


def _train_mode_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].train()
    return model


def test_fold_bn_skips_batch_norm_captured_in_training_mode():
    """optimize() captures in eval mode; a graph exported directly from a training-mode BN must not be folded."""
    model, x = _train_mode_bn(), torch.randn(4, 3, 8, 8)
    gm = torch.export.export(model, (x,), strict=False).module()
    records = fxcompress.PassManager(["fold_bn"], verify=False).run(gm, fxcompress.PassContext((x,), {}))
    result = records[0].result
    assert result.rewritten == []
    assert result.skipped and all("training mode" in why for _, why in result.skipped), result.skipped
    assert batch_norm_nodes(gm)


SKIP_CASES = {
    "no running statistics": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval(), (4, 3, 8, 8)),
    "other users": (lambda: OtherUsers().eval(), (2, 3, 8, 8)),
    "more than one call site": (lambda: SharedConv().eval(), (2, 4, 8, 8)),
    "non-feature dim": (lambda: LinearOnSequence().eval(), (3, 5, 8)),
}


@pytest.mark.parametrize("reason", list(SKIP_CASES))
def test_fold_bn_skips_what_it_cannot_fold_exactly(reason):
    make_model, shape = SKIP_CASES[reason]
    model, x = make_model(), torch.randn(*shape)
    out = fxcompress.optimize(model, (x,), passes=["fold_bn"], report=False)
    result = out.report.results["fold_bn"]
    assert result.rewritten == []
    assert result.skipped and all(reason in why for _, why in result.skipped), result.skipped
    assert batch_norm_nodes(out)


def test_eliminate_identity_removes_eval_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU()).eval()
    x = torch.randn(3, 4)
    out = fxcompress.optimize(model, (x,), passes=["eliminate_identity"], report=False)
    assert not [n for n in out.graph.nodes if "dropout" in str(n.target)]
    assert torch.equal(model(x), out(x))
