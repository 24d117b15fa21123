"""Knowledge distillation: train a (compressed) student to match a frozen teacher.

``distill(student, teacher, data, DistillConfig(steps=...))`` is the recovery step after pruning or
low-rank factorisation, and what ``fxcompress.optimize(..., recover=DistillConfig(...), recover_data=...)``
calls with the compressed graph as student and the original model as teacher. Under ``torchrun`` it trains
with ``DistributedDataParallel`` and shards the data with ``DistributedSampler``.

A student captured with ``torch.export`` (any ``GraphModule`` fxcompress returns) cannot switch
between train and eval mode: it trains with the semantics it was captured with, i.e. batch norm
uses its running statistics and dropout is off. Its parameters are ordinary ``nn.Parameter``\\ s,
so gradients flow through the graph as usual.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .distill_config import DistillConfig, OutputKey
from .errors import InvalidInputError
from .quiet import progress_enabled
from .training import (
    Batch, DistributedContext, checkpoint_path, frozen, load_checkpoint, make_loader, make_optimizer, make_schedule,
    rng_state, save_checkpoint, seed_everything, set_rng_state, training_mode,
)


@dataclass
class DistillHistory:
    """Per-step record of a run (means over ranks when distributed). ``task_loss`` is NaN for steps
    whose batch had no labels or when ``alpha == 1``."""

    loss: list[float] = field(default_factory=list)
    distill_loss: list[float] = field(default_factory=list)
    task_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


class DistillResult(NamedTuple):
    """``student, history = distill(...)``; the student is trained in place and returned."""

    student: torch.nn.Module
    history: DistillHistory


@dataclass
class StepInfo:
    """What each callback receives after every optimisation step, on every rank."""

    step: int
    total_steps: int
    loss: float
    lr: float
    student: torch.nn.Module
    rank: int
    is_main: bool


RUN_OPTIONS = ("device", "progress", "checkpoint_dir", "resume", "callbacks")
"""The options of :func:`distill` that say where and how a run goes, not what it trains (not in the config)."""


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: Any,
    config: DistillConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    callbacks: Sequence[Callable[[StepInfo], Any]] = (),
    **options: Any,
) -> DistillResult:
    """Train ``student`` to reproduce ``teacher`` on ``data``; return ``(student, history)``.

    ``config`` is a :class:`DistillConfig` (steps or epochs, loss, optimiser, schedule, ...); its
    fields may instead be given as keywords (``distill(s, t, data, steps=100, lr=1e-3)`` is
    ``distill(s, t, data, DistillConfig(steps=100, lr=1e-3))``).

    Data: a ``Dataset`` (batched with ``batch_size``, shuffled), a ``DataLoader``, or a list of
    batches; under ``torchrun`` a ``Dataset`` or ``DataLoader`` (``batch_size`` is per rank). A
    batch is a tensor ``x``, a dict of keyword inputs with an optional ``"labels"`` entry, or
    ``(inputs, labels)`` — see :mod:`fxcompress.training`.

    The teacher is frozen for the run (``requires_grad`` off, eval mode, run under ``no_grad``)
    and restored afterwards. ``checkpoint_dir`` gets a checkpoint every ``checkpoint_every`` steps
    and at the end (student, optimiser, schedule, step, data position, RNG states); ``resume=True``
    continues from it (``resume=path`` from a given file), giving the same result as an
    uninterrupted run. Each callback is called with a :class:`StepInfo` after every step. Only rank
    0 shows progress (by default when stderr is a terminal) and writes checkpoints.
    """
    if config is None:
        config = DistillConfig.of(options)
    elif not isinstance(config, DistillConfig):
        raise InvalidInputError(f"config must be a fxcompress.DistillConfig, not {type(config).__name__}")
    elif options:
        raise InvalidInputError(f"give the training options either in config= or as keywords, not both: {sorted(options)}")
    if student is teacher:
        raise InvalidInputError("student and teacher are the same module; distill a copy, e.g. copy.deepcopy(model)")
    device = torch.device(device) if device is not None else _device_of(student)
    if config.seed is not None:
        seed_everything(config.seed)
    ctx = DistributedContext.setup(device)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        loader = make_loader(data, config.batch_size, ctx, config.seed)
        total_steps = config.steps if config.steps is not None else config.epochs * _batches_per_epoch(loader)
        if config.warmup_steps >= total_steps:
            raise InvalidInputError(f"warmup_steps={config.warmup_steps} must be smaller than the {total_steps} training steps")
        trainer = _Trainer(student.to(device), teacher.to(device), loader, ctx, device, total_steps, config, list(callbacks))
        optim = make_optimizer(config.optimizer, _trainable_parameters(student), config.lr, config.weight_decay, config.momentum)
        sched = make_schedule(optim, config.schedule, total_steps, config.warmup_steps)
        path = checkpoint_path(checkpoint_dir, resume)
        if path is not None:
            trainer.restore(load_checkpoint(path), optim, sched)
        with frozen(teacher), training_mode(student):
            trainer.run(optim, sched, checkpoint_dir, config.checkpoint_every, progress)
        return DistillResult(student, trainer.history)
    finally:
        ctx.teardown()


class _Trainer:
    """The training loop and its resumable position (step, epoch, batches into the epoch)."""

    def __init__(self, student, teacher, loader, ctx: DistributedContext, device, total_steps: int,
                 config: DistillConfig, callbacks: list):
        self.student, self.teacher, self.loader, self.ctx, self.device = student, teacher, loader, ctx, device
        self.total_steps = total_steps
        self.loss, self.temperature, self.alpha, self.output_key = config.loss, config.temperature, config.distill_weight, config.output_key
        self.max_grad_norm, self.callbacks = config.max_grad_norm, callbacks
        self.history = DistillHistory()
        self.step = self.epoch = self.batches_into_epoch = 0
        self.resume_rng: dict | None = None
        self.epoch_rng: dict | None = None

    def restore(self, checkpoint: dict, optim, sched) -> None:
        self.student.load_state_dict(checkpoint["student"])
        optim.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        self.step, self.epoch, self.batches_into_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["batches_into_epoch"]
        self.history = DistillHistory(**checkpoint["history"])
        rank = self.ctx.rank if len(checkpoint["rng"]) == self.ctx.world_size else 0
        self.resume_rng, self.epoch_rng = checkpoint["rng"][rank], checkpoint["epoch_rng"][rank]

    def run(self, optim, sched, checkpoint_dir, checkpoint_every: int, progress: bool) -> None:
        model = DistributedDataParallel(self.student) if self.ctx.enabled else self.student
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="distill",
                   disable=not (progress_enabled(progress) and self.ctx.is_main), dynamic_ncols=True)
        started = time.perf_counter() - self.history.seconds
        with bar:
            while self.step < self.total_steps:
                trained_this_epoch = False
                for item in self._epoch_batches():
                    self._train_step(model, Batch.of(item).to(self.device), optim, sched)
                    trained_this_epoch = True
                    self.history.seconds = time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.history.loss[-1]:.4g}", lr=f"{self.history.lr[-1]:.2e}",
                                    samples_per_s=f"{self.history.samples_per_second:.0f}")
                    info = StepInfo(self.step, self.total_steps, self.history.loss[-1], self.history.lr[-1],
                                    self.student, self.ctx.rank, self.ctx.is_main)
                    for callback in self.callbacks:
                        callback(info)
                    if checkpoint_dir is not None and (self.step % checkpoint_every == 0 or self.step == self.total_steps):
                        self._save(checkpoint_dir, optim, sched)
                    if self.step >= self.total_steps:
                        break
                else:
                    if not trained_this_epoch and self.batches_into_epoch == 0:
                        raise InvalidInputError("data yielded no batches; pass a non-empty Dataset, DataLoader or list")
                    self.epoch += 1
                    self.batches_into_epoch = 0

    def _epoch_batches(self) -> Iterator:
        """The batches of the current epoch; after a resume, from where the checkpoint was taken.

        The RNG state at the start of the epoch is replayed so a shuffling loader yields the same
        order, the batches already trained on are skipped, then the checkpoint's RNG state is restored.
        """
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if self.resume_rng is None:
            self.epoch_rng = rng_state()
            return iter(self.loader)
        set_rng_state(self.epoch_rng)
        batches = iter(self.loader)
        for _ in itertools.islice(batches, self.batches_into_epoch):
            pass
        set_rng_state(self.resume_rng)
        self.resume_rng = None
        return batches

    def _train_step(self, model, batch: Batch, optim, sched) -> None:
        with torch.no_grad():
            target = _select(self.teacher(*batch.args, **batch.kwargs), self.output_key)
        prediction = _select(model(*batch.args, **batch.kwargs), self.output_key)
        distill_loss = _distillation_loss(self.loss, prediction, target, self.temperature)
        if self.loss == "kl+ce" and batch.labels is None:
            raise InvalidInputError('loss="kl+ce" needs labels: batches of (inputs, labels) or dicts with "labels"')
        use_labels = batch.labels is not None and self.alpha < 1
        task_loss = _task_loss(prediction, batch.labels) if use_labels else None
        total = self.alpha * distill_loss + (1 - self.alpha) * task_loss if use_labels else distill_loss
        optim.zero_grad(set_to_none=True)
        total.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        lr = optim.param_groups[0]["lr"]
        optim.step()
        sched.step()
        self.step += 1
        self.batches_into_epoch += 1
        losses = self.ctx.mean([total.item(), distill_loss.item(), task_loss.item() if use_labels else math.nan])
        self.history.loss.append(losses[0])
        self.history.distill_loss.append(losses[1])
        self.history.task_loss.append(losses[2])
        self.history.lr.append(lr)
        self.history.samples += batch.size() * self.ctx.world_size

    def _save(self, checkpoint_dir, optim, sched) -> None:
        rng, epoch_rng = self.ctx.gather(rng_state()), self.ctx.gather(self.epoch_rng)
        if self.ctx.is_main:
            save_checkpoint(checkpoint_dir, {
                "student": self.student.state_dict(), "optimizer": optim.state_dict(), "scheduler": sched.state_dict(),
                "step": self.step, "epoch": self.epoch, "batches_into_epoch": self.batches_into_epoch,
                "history": asdict(self.history), "rng": rng, "epoch_rng": epoch_rng,
            })


def _distillation_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    if prediction.shape != target.shape:
        raise InvalidInputError(
            f"student output has shape {tuple(prediction.shape)} but the teacher's has {tuple(target.shape)}; "
            "choose outputs of the same shape with output_key="
        )
    target = target.to(prediction.dtype)
    if kind == "mse":
        return F.mse_loss(prediction, target)
    if kind == "cosine":
        return 1 - F.cosine_similarity(prediction, target, dim=-1).mean()
    # KL(teacher || student) on softened distributions; the T² factor keeps gradient magnitudes
    # comparable across temperatures (Hinton et al., 2015).
    classes = prediction.shape[-1]
    log_student = F.log_softmax(prediction.reshape(-1, classes) / temperature, dim=-1)
    log_teacher = F.log_softmax(target.reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def _task_loss(prediction: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(prediction.reshape(-1, prediction.shape[-1]), labels.reshape(-1).long())


def _select(output: Any, key: OutputKey) -> torch.Tensor:
    """The tensor to match from a model output (tensor, tuple, dict or HF ``ModelOutput``)."""
    if callable(key):
        selected = key(output)
    elif isinstance(output, torch.Tensor) and key is None:
        selected = output
    elif isinstance(output, Mapping):
        name = "logits" if key is None else key
        if name not in output:
            raise InvalidInputError(
                f"the model returns a {type(output).__name__} with keys {list(output)}; "
                f"pick the tensor to match with output_key= one of them"
            )
        selected = output[name]
    elif isinstance(output, list | tuple):
        index = 0 if key is None else key
        if not isinstance(index, int) or not -len(output) <= index < len(output):
            raise InvalidInputError(
                f"the model returns a {type(output).__name__} of {len(output)} elements; "
                f"output_key must be an index in range, not {key!r}"
            )
        selected = output[index]
    else:
        raise InvalidInputError(f"cannot pick output_key={key!r} from a model output of type {type(output).__name__}")
    if not isinstance(selected, torch.Tensor):
        raise InvalidInputError(f"output_key={key!r} selects a {type(selected).__name__}, not a tensor")
    return selected


def _batches_per_epoch(loader: Any) -> int:
    try:
        return len(loader)
    except TypeError:
        raise InvalidInputError("epochs= needs data with a length; pass steps= for data of unknown length") from None


def _trainable_parameters(student: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require grad; the others stay fixed, with a warning naming them."""
    frozen = [name for name, p in student.named_parameters() if not p.requires_grad]
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise InvalidInputError("the student has no parameter with requires_grad=True; nothing to train")
    if frozen:
        warnings.warn(
            f"distill trains only parameters with requires_grad=True; {len(frozen)} stay fixed: "
            f"{', '.join(frozen[:8])}{', ...' if len(frozen) > 8 else ''}. "
            "Call p.requires_grad_(True) on them first to train them too.", stacklevel=3)
    return trainable


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


__all__ = ["RUN_OPTIONS", "DistillHistory", "DistillResult", "StepInfo", "distill"]
