"""Every bad input gets one error of the type for its cause, naming the cause and the fix, and the
user's model is untouched. One row per input: (what the user does, exception type, cause text, fix text)."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
import torch.nn as nn

import fxcompress
from fxcompress.errors import (
    ArchiveError, CaptureError, FxCompressWarning, InferenceOnlyError, InvalidInputError, PassConfigError,
    UnknownPassError,
)
from fxcompress.passes import Int8, LowRank, PruneChannels
from tests.test_never_mutate import LOADER, X, make_net
from tests.untouched import assert_untouched, snapshot


class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.sum() > 0 else y


def _file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _saved(tmp_path) -> bytes:
    fxcompress.save(fxcompress.optimize(make_net(), X, report=False), tmp_path / "good.pt2")
    return (tmp_path / "good.pt2").read_bytes()


def _torch_save(tmp_path) -> str:
    torch.save(make_net().state_dict(), tmp_path / "weights.pt")
    return str(tmp_path / "weights.pt")


N_PRUNE_OPTIONS = len(dataclasses.fields(PruneChannels))

ROWS = [
    # id, action(model, tmp_path), exception, cause, fix
    ("unknown pass option", lambda m, t: PruneChannels(ratoi=0.5), PassConfigError, "no option 'ratoi'", "did you mean 'ratio'"),
    ("unknown option lists the valid ones", lambda m, t: Int8(skp=["a"]), PassConfigError, "no option 'skp'", "skip: tuple[str, ...]"),
    ("option of the wrong type", lambda m, t: PruneChannels(ratio="half"), PassConfigError, "ratio='half' is a str", "expected float | None"),
    ("bool where a number goes", lambda m, t: LowRank(rank=True), PassConfigError, "rank=True is a bool", "int | float | None"),
    ("option out of range", lambda m, t: PruneChannels(ratio=1.5), PassConfigError, "ratio=1.5", "[0, 1)"),
    ("two targets", lambda m, t: PruneChannels(ratio=0.5, target_macs=0.5), PassConfigError, "not both", "ratio="),
    ("unknown attention unit", lambda m, t: PruneChannels(attention="heads"), PassConfigError, "attention='heads'", "'query_heads'"),
    ("too many positional options", lambda m, t: PruneChannels(*[None] * (N_PRUNE_OPTIONS + 1)), PassConfigError, f"at most {N_PRUNE_OPTIONS} options", "valid options"),
    ("option by name for an unknown option", lambda m, t: fxcompress.make_pass("fold_bn", ratio=0.5), PassConfigError, "no option 'ratio'", "valid options"),
    ("static int8 without scales", lambda m, t: Int8(mode="static"), PassConfigError, "needs activation_scales", "fxcompress.calibrate"),
    ("bad selector", lambda m, t: Int8(skip=[3]), PassConfigError, "skip", "module names or globs"),
    ("unknown pass name", lambda m, t: fxcompress.optimize(m, X, passes=["prune"]), UnknownPassError, "unknown pass 'prune'", "prune_channels"),
    ("passes not a list", lambda m, t: fxcompress.optimize(m, X, passes=42), InvalidInputError, "not int", "passes=['fold_bn'"),
    ("a pass that is not a pass", lambda m, t: fxcompress.make_pass(42), PassConfigError, "not int", "a name or a Pass object"),
    ("example inputs of the wrong kind", lambda m, t: fxcompress.optimize(m, "x"), InvalidInputError, "not str", "torch.randn"),
    ("example inputs of the wrong shape", lambda m, t: fxcompress.optimize(m, torch.randn(4, 5)), InvalidInputError, "does not run on the given example inputs", "Pass inputs the model accepts"),
    ("no tensor in the inputs", lambda m, t: fxcompress.optimize(m, (3,)), InvalidInputError, "contain no tensor", "at least one input tensor"),
    ("not a module", lambda m, t: fxcompress.optimize(lambda x: x, X), InvalidInputError, "must be a torch.nn.Module", "torch.nn.Module"),
    ("float64 model", lambda m, t: fxcompress.optimize(make_net().double(), X.double()), InvalidInputError, "torch.float64", "model.float()"),
    ("data-dependent branch", lambda m, t: fxcompress.optimize(DataDependentBranch().eval(), torch.randn(2, 8)), CaptureError, "data-dependent", "torch.cond"),
    ("recover without data", lambda m, t: fxcompress.optimize(m, X, recover=dict(steps=2)), InvalidInputError, "needs at least `data`", "recover=dict(data=loader"),
    ("recover with an unknown option", lambda m, t: fxcompress.optimize(m, X, recover=dict(data=LOADER, stepz=2)), InvalidInputError, "no option(s) ['stepz']", "steps"),
    ("distill with a string lr", lambda m, t: fxcompress.distill(fxcompress.capture(m, X), m, LOADER, steps=1, lr="x"), InvalidInputError, "lr must be a number", "not str"),
    ("distill student is the teacher", lambda m, t: fxcompress.distill(m, m, LOADER, steps=1), InvalidInputError, "same module", "copy.deepcopy"),
    ("calibrate on one batch", lambda m, t: fxcompress.calibrate(m, X), InvalidInputError, "is one batch", "list of batches"),
    ("calibrate on nothing", lambda m, t: fxcompress.calibrate(m, []), InvalidInputError, "empty", "at least one batch"),
    ("calibrate on an unreadable batch", lambda m, t: fxcompress.calibrate(m, [(X, X, X)]), InvalidInputError, "with 3 elements", "(inputs, labels)"),
    ("train() on a compressed model", lambda m, t: fxcompress.optimize(m, X, report=False).train(), InferenceOnlyError, "captured inference graph", "fxcompress.distill"),
    ("load an empty file", lambda m, t: fxcompress.load(_file(t, "e.pt2", b"")), ArchiveError, "empty", "fxcompress.save"),
    ("load a random file", lambda m, t: fxcompress.load(_file(t, "r.pt2", os.urandom(512))), ArchiveError, "not an fxcompress/.pt2 archive", "fxcompress.save"),
    ("load a truncated archive", lambda m, t: fxcompress.load(_file(t, "t.pt2", _saved(t)[:4000])), ArchiveError, "truncated", "save it again"),
    ("load a torch.save file", lambda m, t: fxcompress.load(_torch_save(t)), ArchiveError, "torch.save checkpoint", "torch.load"),
    ("load a missing file", lambda m, t: fxcompress.load(t / "missing.pt2"), FileNotFoundError, "missing.pt2", "fxcompress.save"),
    ("save a model fxcompress did not capture", lambda m, t: fxcompress.save(m, t / "m.pt2"), InvalidInputError, "needs example inputs", "example_inputs="),
]


@pytest.mark.parametrize("action,error,cause,fix", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_raises_one_clear_error(action, error, cause, fix, tmp_path):
    model = make_net()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxCompressWarning)
        with pytest.raises(error) as caught:
            action(model, tmp_path)
    message = str(caught.value)
    assert cause in message, message
    assert fix in message, message
    assert isinstance(caught.value, fxcompress.FxCompressError) or error is FileNotFoundError
    assert_untouched(model, before)


def test_capture_failure_prints_nothing_to_stderr(capfd):
    with pytest.raises(CaptureError):
        fxcompress.optimize(DataDependentBranch().eval(), torch.randn(2, 8))
    captured = capfd.readouterr()
    assert "def forward" not in captured.err and "Unable to find user code" not in captured.err


def test_load_error_prints_no_torch_traceback(tmp_path, capfd):
    with pytest.raises(ArchiveError):
        fxcompress.load(_file(tmp_path, "r.pt2", os.urandom(512)))
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("make_pass,expected", [
    (lambda: PruneChannels(ratio=0.95, max_ratio_per_group=1.0), "parameters are left"),
    (lambda: LowRank(rank=1), "factorized to rank 1"),
])
def test_extreme_settings_warn_with_what_is_left(make_pass, expected):
    with pytest.warns(FxCompressWarning, match=expected):
        fxcompress.optimize(make_net(), X, passes=[make_pass()], report=False)


def test_max_ratio_per_group_applies_in_local_scope():
    report = fxcompress.optimize(make_net(), X, passes=[PruneChannels(ratio=0.8, max_ratio_per_group=0.5)], report=False).report
    groups = report.results["prune_channels"].details[1:]
    assert groups and all(g["removed_units"] <= 0.5 * g["units"] for g in groups)
