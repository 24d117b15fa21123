"""fxcompress.distill: it recovers the teacher, never touches it, repeats with a seed, resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxcompress
from fxcompress.distill import distill
from fxcompress.errors import InvalidInputError

FEATURES, CLASSES = 16, 5


def make_teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES)).eval()


def make_student(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, CLASSES))


def make_dataset(n: int = 256, with_labels: bool = True) -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, FEATURES, generator=generator)
    if not with_labels:
        return TensorDataset(x)
    return TensorDataset(x, make_teacher()(x).argmax(-1).detach())


def kl_to_teacher(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return F.kl_div(F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1), log_target=True,
                        reduction="batchmean").item()


def gap_to_teacher(metric: str, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    """The held-out distance each loss minimises: KL, MSE or 1 - cosine similarity of the logits."""
    if metric == "kl":
        return kl_to_teacher(student, teacher, x)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    return F.mse_loss(s, t).item() if metric == "mse" else 1 - F.cosine_similarity(s, t, dim=-1).mean().item()


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


HELD_OUT = torch.randn(512, FEATURES, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("loss", ["kl", "mse", "cosine"])
def test_distillation_moves_student_towards_teacher_and_leaves_teacher_alone(loss):
    teacher, student = make_teacher(), make_student()
    teacher_before = params(teacher)
    flags_before = [p.requires_grad for p in teacher.parameters()]
    gap_before = gap_to_teacher(loss, student, teacher, HELD_OUT)
    trained, history = distill(student, teacher, make_dataset(with_labels=False), steps=150, loss=loss, lr=1e-2,
                               batch_size=32, seed=0, progress=False)
    assert trained is student
    assert gap_to_teacher(loss, student, teacher, HELD_OUT) < 0.3 * gap_before
    assert len(history.loss) == 150
    assert sum(history.distill_loss[-10:]) < 0.5 * sum(history.distill_loss[:10])
    assert_same_params(params(teacher), teacher_before)
    assert [p.requires_grad for p in teacher.parameters()] == flags_before
    assert not teacher.training


def test_teacher_is_frozen_during_training():
    teacher, student = make_teacher().train(), make_student()
    seen = []
    distill(student, teacher, make_dataset(), steps=3, progress=False,
            callbacks=[lambda info: seen.append((teacher.training, any(p.requires_grad for p in teacher.parameters()),
                                                 info.student.training))])
    assert seen == [(False, False, True)] * 3
    assert teacher.training  # the caller's mode comes back


def test_labels_add_cross_entropy_weighted_by_alpha():
    teacher, student = make_teacher(), make_student()
    _, history = distill(student, teacher, make_dataset(), steps=20, loss="kl+ce", alpha=0.3, lr=1e-2, progress=False)
    for total, kl, ce in zip(history.loss, history.distill_loss, history.task_loss):
        assert total == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-5)
    with pytest.raises(InvalidInputError, match="needs labels"):
        distill(make_student(), teacher, make_dataset(with_labels=False), steps=2, loss="kl+ce", progress=False)


def test_seed_makes_runs_identical():
    teacher = make_teacher()
    loader = DataLoader(make_dataset(), batch_size=16, shuffle=True)
    runs = []
    for seed in (7, 7, 8):
        student = make_student(dropout=0.3)
        _, history = distill(student, teacher, loader, steps=25, seed=seed, progress=False)
        runs.append((params(student), history.loss))
    assert_same_params(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]


class Interrupted(Exception):
    pass


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    teacher = make_teacher()
    loader = DataLoader(make_dataset(100), batch_size=16, shuffle=True)  # 7 batches/epoch, last one short
    options = dict(steps=20, loss="kl+ce", optimizer="sgd", lr=0.05, schedule="cosine", warmup_steps=3, seed=3,
                   progress=False)
    uninterrupted = make_student(dropout=0.2)
    _, full_history = distill(uninterrupted, teacher, loader, **options)

    def stop_at_step_13(info):
        if info.step == 13:
            raise Interrupted

    with pytest.raises(Interrupted):
        distill(make_student(dropout=0.2), teacher, loader, checkpoint_dir=tmp_path, checkpoint_every=5,
                callbacks=[stop_at_step_13], **options)
    assert (tmp_path / "checkpoint.pt").exists()
    torch.manual_seed(12345)  # the process RNG moved on; the checkpoint must restore it
    resumed = make_student(dropout=0.2)
    _, resumed_history = distill(resumed, teacher, loader, checkpoint_dir=tmp_path, checkpoint_every=5, resume=True,
                                 **options)
    assert_same_params(params(resumed), params(uninterrupted))
    assert resumed_history.loss == full_history.loss
    assert resumed_history.lr == full_history.lr


def test_resume_with_explicit_missing_path_is_an_error(tmp_path):
    with pytest.raises(InvalidInputError, match="no checkpoint"):
        distill(make_student(), make_teacher(), make_dataset(), steps=2, resume=tmp_path / "nope.pt", progress=False)


class HFStyleClassifier(nn.Module):
    """Keyword inputs in, a transformers ``ModelOutput`` out, like a Hugging Face model."""

    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, features, scale=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.body(features if scale is None else features * scale)
        return SequenceClassifierOutput(logits=self.head(hidden), hidden_states=(hidden,))


def test_hf_style_outputs_and_dict_batches():
    torch.manual_seed(0)
    teacher, student = HFStyleClassifier(48).eval(), HFStyleClassifier(8)
    dataset = make_dataset()
    batches = [{"features": x, "labels": y} for x, y in DataLoader(dataset, batch_size=32)]
    x = HELD_OUT
    gap_before = F.mse_loss(student(features=x).logits, teacher(features=x).logits).item()
    _, history = distill(student, teacher, batches, epochs=10, loss="mse", alpha=0.9, output_key="logits", lr=1e-2,
                         progress=False)
    assert len(history.loss) == 10 * len(batches)
    assert not any(map(torch.isnan, torch.tensor(history.task_loss)))
    assert F.mse_loss(student(features=x).logits, teacher(features=x).logits).item() < 0.3 * gap_before
    with pytest.raises(InvalidInputError, match="keys"):
        distill(HFStyleClassifier(8), teacher, batches, steps=1, output_key="pooler", progress=False)


def test_exported_graph_module_student():
    torch.manual_seed(0)
    teacher = make_teacher()
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(16, CLASSES)).eval()
    example = torch.randn(8, FEATURES)
    dynamic_batch = ({0: torch.export.Dim.AUTO},)
    student = torch.export.export(model, (example,), strict=False, dynamic_shapes=dynamic_batch).module()
    kl_before = kl_to_teacher(student, teacher, HELD_OUT)
    running_mean = student.get_buffer("1.running_mean").clone()
    loader = DataLoader(make_dataset(), batch_size=8, shuffle=True, drop_last=True)
    _, history = distill(student, teacher, loader, steps=120, lr=1e-2, seed=0, progress=False)
    assert kl_to_teacher(student, teacher, HELD_OUT) < 0.3 * kl_before
    # captured in eval mode: batch norm used (and kept) its running statistics
    assert torch.equal(student.get_buffer("1.running_mean"), running_mean)


def test_schedules_come_from_torch_optim():
    teacher = make_teacher()
    _, cosine = distill(make_student(), teacher, make_dataset(), steps=20, lr=0.1, warmup_steps=4, progress=False)
    assert cosine.lr[0] == pytest.approx(0.1 / 5)
    assert cosine.lr[4] == pytest.approx(0.1)
    assert cosine.lr[:5] == sorted(cosine.lr[:5]) and cosine.lr[4:] == sorted(cosine.lr[4:], reverse=True)
    assert cosine.lr[-1] < 0.01
    _, step = distill(make_student(), teacher, make_dataset(), steps=9, lr=0.1, schedule="step", progress=False)
    assert step.lr == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 3)
    _, constant = distill(make_student(), teacher, make_dataset(), steps=5, lr=0.1, schedule="constant",
                          optimizer="adam", progress=False)
    assert constant.lr == pytest.approx([0.1] * 5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(steps=5, loss="kld"), "valid values: 'kl', 'mse', 'kl\\+ce', 'cosine'"),
        (dict(steps=5, optimizer="lamb"), "valid values: 'adamw', 'adam', 'sgd'"),
        (dict(steps=5, schedule="linear"), "valid values: 'cosine', 'step', 'constant'"),
        (dict(), "exactly one of steps"),
        (dict(steps=5, epochs=1), "exactly one of steps"),
        (dict(steps=5, alpha=1.5), "alpha"),
        (dict(steps=5, warmup_steps=5), "warmup_steps"),
        (dict(steps=0), "positive integer"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(InvalidInputError, match=message):
        distill(make_student(), make_teacher(), make_dataset(), progress=False, **options)


def test_bad_data_and_outputs_are_clear_errors():
    teacher = make_teacher()
    with pytest.raises(InvalidInputError, match="one-shot iterator"):
        distill(make_student(), teacher, iter([torch.randn(4, FEATURES)]), steps=1, progress=False)
    with pytest.raises(InvalidInputError, match="no batches"):
        distill(make_student(), teacher, [], steps=1, progress=False)
    with pytest.raises(InvalidInputError, match="cannot read a batch"):
        distill(make_student(), teacher, [(1, 2, 3)], steps=1, progress=False)
    wide = nn.Linear(FEATURES, CLASSES + 1)
    with pytest.raises(InvalidInputError, match="shape"):
        distill(wide, teacher, [torch.randn(4, FEATURES)], steps=1, progress=False)
    with pytest.raises(InvalidInputError, match="same module"):
        distill(teacher, teacher, [torch.randn(4, FEATURES)], steps=1, progress=False)


def test_progress_bar_reports_loss_and_throughput(capsys):
    distill(make_student(), make_teacher(), make_dataset(), steps=3, progress=True)
    err = capsys.readouterr().err
    assert "distill" in err and "loss=" in err and "samples_per_s=" in err


def test_frozen_student_parameters_stay_fixed_with_a_warning():
    student = make_student()
    student[0].weight.requires_grad_(False)
    frozen_before = student[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="0.weight"):
        distill(student, make_teacher(), make_dataset(), steps=5, lr=1e-2, progress=False)
    assert torch.equal(student[0].weight, frozen_before)


def test_optimize_recover_distills_after_the_passes_and_reports_it():
    torch.manual_seed(0)
    from fxcompress.passes import LowRank

    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    data = [torch.randn(16, 32) for _ in range(8)]
    passes = [LowRank(rank=4, include=("**",))]
    plain = fxcompress.optimize(teacher, (data[0],), passes=passes, report=False)
    recovered = fxcompress.optimize(
        teacher, (data[0],), passes=passes, report=False, recover=dict(data=data, steps=200, lr=1e-2, loss="mse", progress=False, seed=0)
    )
    held_out = torch.randn(64, 32)
    with torch.no_grad():
        err_plain = (plain(held_out) - teacher(held_out)).pow(2).mean()
        err_recovered = (recovered(held_out) - teacher(held_out)).pow(2).mean()
    assert err_recovered < 0.8 * err_plain  # measured 0.65: rank 4 cannot match the teacher exactly
    assert recovered.report.rows[-1]["stage"] == "recover"
    assert recovered.report.rows[-1]["max_abs_err"] < plain.report.rows[-1]["max_abs_err"]


def test_distill_config_is_plain_data_and_the_keywords_are_its_alias():
    config = fxcompress.DistillConfig(steps=5, lr=1e-2, seed=3)
    assert config == fxcompress.DistillConfig(steps=5, lr=1e-2, seed=3) and hash(config)
    assert config.config()["lr"] == 1e-2 and "steps=5" in repr(config)
    with pytest.raises(Exception):
        config.lr = 1.0  # frozen
    with pytest.raises(InvalidInputError, match="alpha"):
        fxcompress.DistillConfig(steps=5, alpha=2.0)  # validated on construction
    typed, _ = distill(make_student(), make_teacher(), make_dataset(), config, progress=False)
    keywords, _ = distill(make_student(), make_teacher(), make_dataset(), steps=5, lr=1e-2, seed=3, progress=False)
    assert_same_params(params(typed), params(keywords))
    with pytest.raises(InvalidInputError, match="not both"):
        distill(make_student(), make_teacher(), make_dataset(), config, steps=5)
    with pytest.raises(InvalidInputError, match=r"no option\(s\) \['stepz'\]"):
        distill(make_student(), make_teacher(), make_dataset(), stepz=5)


def test_optimize_recover_takes_a_distill_config_like_the_dict_alias():
    teacher = make_teacher()
    data = [torch.randn(8, FEATURES, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = fxcompress.DistillConfig(steps=3, lr=1e-2, seed=0)
    typed = fxcompress.optimize(teacher, (data[0],), report=False, recover=config, recover_data=data, progress=False)
    alias = fxcompress.optimize(teacher, (data[0],), report=False, recover=dict(data=data, steps=3, lr=1e-2, seed=0, progress=False))
    assert typed.report.rows[-1]["stage"] == "recover"
    assert_same_params(params(typed), params(alias))
    with pytest.raises(InvalidInputError, match="recover_data"):
        fxcompress.optimize(teacher, (data[0],), report=False, recover=config)
