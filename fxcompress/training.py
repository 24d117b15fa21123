"""Training plumbing for :func:`fxcompress.distill`: batches, data loaders, torch.distributed,
optimizers and schedules from ``torch.optim``, checkpoints, RNG state and train/eval modes.

Batch convention (what one item of ``data`` may be):

* a ``Tensor`` ``x`` — the model's only positional input, no labels;
* a ``dict`` — keyword inputs; a ``"labels"`` entry, if present, is taken out as the labels;
* a ``tuple``/``list`` ``(inputs,)`` or ``(inputs, labels)`` — ``inputs`` is a tensor, a tuple of
  positional inputs or a dict of keyword inputs; ``labels`` may be ``None``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from .errors import InvalidInputError
from .inputs import Inputs

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULES = ("cosine", "step", "constant")
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Batch(Inputs):
    """One training batch: the model's inputs plus (optional) labels."""

    labels: torch.Tensor | None = None

    @classmethod
    def of(cls, item: Any) -> "Batch":
        if isinstance(item, torch.Tensor):
            return cls((item,), {}, None)
        if isinstance(item, Mapping):
            kwargs = dict(item)
            return cls((), kwargs, kwargs.pop("labels", None))
        if isinstance(item, list | tuple) and len(item) in (1, 2):
            inputs, labels = item[0], (item[1] if len(item) == 2 else None)
            if isinstance(inputs, torch.Tensor):
                return cls((inputs,), {}, labels)
            if isinstance(inputs, Mapping):
                return cls((), dict(inputs), labels)
            if isinstance(inputs, list | tuple):
                return cls(tuple(inputs), {}, labels)
        raise InvalidInputError(
            f"cannot read a batch of type {type(item).__name__}"
            + (f" with {len(item)} elements" if isinstance(item, list | tuple) else "")
            + "; a batch is a tensor `x`, a dict of keyword inputs (optional 'labels' entry), "
            "or a pair `(inputs, labels)` where inputs is a tensor, a tuple or a dict"
        )

    def to(self, device: torch.device) -> "Batch":
        labels = self.labels.to(device, non_blocking=True) if isinstance(self.labels, torch.Tensor) else self.labels
        return Batch(*self.moved(device), labels)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: torch.device) -> "DistributedContext":
        """Join the process group torchrun prepared (``WORLD_SIZE``/``RANK`` set), or reuse one.

        The backend is NCCL for CUDA devices and Gloo otherwise.
        """
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise InvalidInputError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, True)

    def mean(self, values: list[float]) -> list[float]:
        """The means of scalars over all ranks (the values themselves when not distributed)."""
        if not self.enabled:
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def teardown(self) -> None:
        """Leave the group together: free the DDP reducers still referencing it (they sit in reference
        cycles), wait for every rank, then destroy it. A Gloo group destroyed while a peer still works, or
        left to the interpreter's exit, can abort the process ("terminate called without an active
        exception")."""
        if self.created_group:
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


def make_loader(data: Any, batch_size: int, ctx: DistributedContext, seed: int | None) -> Iterable:
    """An iterable of batches; under torch.distributed, one whose samples are sharded over ranks.

    A map-style ``Dataset`` becomes a shuffled ``DataLoader`` of ``batch_size``. A ``DataLoader``
    is used as is, or rebuilt around a ``DistributedSampler`` (its ``batch_size`` is per rank,
    shuffling kept) when distributed. Any other re-iterable of batches (a list) is used as is,
    single-process only.
    """
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        if ctx.enabled:
            sampler = DistributedSampler(data, ctx.world_size, ctx.rank, shuffle=True, seed=seed or 0)
            return DataLoader(data, batch_size=batch_size, sampler=sampler)
        return DataLoader(data, batch_size=batch_size, shuffle=True)
    if isinstance(data, DataLoader):
        if not ctx.enabled or isinstance(data.sampler, DistributedSampler):
            return data
        if isinstance(data.dataset, IterableDataset) or data.batch_size is None:
            raise InvalidInputError(
                "under torchrun, pass a DataLoader over a map-style Dataset with a batch_size so it can be "
                "sharded with DistributedSampler"
            )
        sampler = DistributedSampler(
            data.dataset, ctx.world_size, ctx.rank, shuffle=isinstance(data.sampler, RandomSampler), seed=seed or 0
        )
        return DataLoader(
            data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
            collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
        )
    if ctx.enabled:
        raise InvalidInputError(
            f"under torchrun, data must be a torch Dataset or DataLoader (sharded with DistributedSampler), "
            f"not {type(data).__name__}"
        )
    if not isinstance(data, Iterable) or isinstance(data, torch.Tensor | Mapping):
        raise InvalidInputError(
            f"data must be a Dataset, a DataLoader or a list of batches, not {type(data).__name__}"
        )
    if iter(data) is data:
        raise InvalidInputError(
            "data is a one-shot iterator; pass something that can be iterated again each epoch "
            "(a DataLoader, a Dataset or a list of batches)"
        )
    return data


def make_optimizer(name: str, parameters: list, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer by name; SGD uses ``momentum``."""
    cls = OPTIMIZERS[name]
    options = {"momentum": momentum} if name == "sgd" else {}
    return cls(parameters, lr=lr, weight_decay=weight_decay, **options)


def make_schedule(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule: optional linear warm-up (``LinearLR``) then ``name`` for the remaining steps.

    ``cosine`` anneals to 0 (``CosineAnnealingLR``), ``step`` divides the rate by 10 after each
    third of training (``StepLR``), ``constant`` keeps it (``ConstantLR`` with factor 1).
    """
    decay_steps = max(1, total_steps - warmup_steps)
    if name == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps)
    elif name == "step":
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, decay_steps // 3), gamma=0.1)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps == 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_path(checkpoint_dir: str | os.PathLike | None, resume: bool | str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``resume=True`` means ``checkpoint_dir``'s, if one was saved."""
    if resume is False or resume is None:
        return None
    if resume is True:
        if checkpoint_dir is None:
            raise InvalidInputError("resume=True needs checkpoint_dir=...; or pass resume='path/to/checkpoint.pt'")
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        return path if path.exists() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise InvalidInputError(f"resume={str(resume)!r}: no checkpoint at {path}")
    return path


def save_checkpoint(checkpoint_dir: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``checkpoint_dir/checkpoint.pt`` atomically (write, then rename)."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    partial = directory / (CHECKPOINT_NAME + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load_checkpoint(path: Path) -> dict:
    # The checkpoint holds RNG states (tuples, numpy-free) and history lists besides tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def set_mode(module: torch.nn.Module, training: bool) -> None:
    try:
        module.train(training)
    except NotImplementedError:
        pass  # a torch.export module keeps the mode it was captured in


@contextlib.contextmanager
def frozen(teacher: torch.nn.Module):
    """The teacher in eval mode without gradients for the run; its flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    was_training = teacher.training
    for p, _ in flags:
        p.requires_grad_(False)
    set_mode(teacher, False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        set_mode(teacher, was_training)


@contextlib.contextmanager
def training_mode(student: torch.nn.Module):
    was_training = student.training
    set_mode(student, True)
    try:
        yield
    finally:
        set_mode(student, was_training)
