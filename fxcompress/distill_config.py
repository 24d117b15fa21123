"""What :func:`fxcompress.distill` trains: :class:`DistillConfig`, plain data validated on construction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .errors import InvalidInputError
from .training import OPTIMIZERS, SCHEDULES

LOSSES = ("kl", "mse", "kl+ce", "cosine")
OutputKey = str | int | Callable[[Any], torch.Tensor] | None


@dataclass(frozen=True)
class DistillConfig:
    """How :func:`distill` trains: plain data, validated on construction (like a pass config), prints,
    compares and saves (:meth:`config`).

    Train for ``steps`` optimiser steps or ``epochs`` passes over the data (exactly one).

    Loss: ``alpha * distillation + (1 - alpha) * cross_entropy(student, labels)``, the task term only
    for batches with labels. ``loss`` picks the distillation term: ``"kl"`` (KL divergence of the
    temperature-softened distributions, times ``temperature**2``), ``"mse"``, ``"cosine"``
    (1 - cosine similarity along the last dimension), or ``"kl+ce"`` (``"kl"`` that requires labels).
    ``alpha`` defaults to 0.5 for ``"kl+ce"`` and 1 otherwise. ``output_key`` picks the tensor to
    match from both models' outputs: a key of a dict/``ModelOutput`` (default ``"logits"``), an index
    of a tuple (default 0) or a function of the output.

    Optimisation: ``optimizer`` (``torch.optim`` AdamW, Adam or SGD with ``momentum``) with ``lr``
    and ``weight_decay``; per-step ``schedule`` (cosine / step / constant) after ``warmup_steps``
    of linear warm-up; optional gradient clipping at ``max_grad_norm``. ``batch_size`` batches a
    ``Dataset`` (per rank under ``torchrun``). ``seed`` makes runs repeatable. ``checkpoint_every``:
    steps between checkpoints when :func:`distill` is given a ``checkpoint_dir``.
    """

    steps: int | None = None
    epochs: int | None = None
    loss: str = "kl"
    temperature: float = 2.0
    alpha: float | None = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    batch_size: int = 32
    output_key: OutputKey = None
    seed: int | None = None
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        _check_options(self)

    @classmethod
    def of(cls, options: Mapping[str, Any], where: str = "distill") -> "DistillConfig":
        """Build from keyword options; an unknown one is an error listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise InvalidInputError(f"{where} has no option(s) {unknown}; it takes: {', '.join(valid)}")
        return cls(**options)

    @property
    def distill_weight(self) -> float:
        """``alpha`` with its default filled in."""
        return self.alpha if self.alpha is not None else (0.5 if self.loss == "kl+ce" else 1.0)

    def config(self) -> dict:
        return asdict(self)


def _check_options(config: DistillConfig) -> None:
    steps, epochs, loss, temperature, alpha = config.steps, config.epochs, config.loss, config.temperature, config.alpha
    optimizer, lr, schedule, warmup_steps = config.optimizer, config.lr, config.schedule, config.warmup_steps
    batch_size, checkpoint_every = config.batch_size, config.checkpoint_every
    if (steps is None) == (epochs is None):
        raise InvalidInputError("give exactly one of steps= (optimiser steps) or epochs= (passes over the data)")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise InvalidInputError(f"{name} must be a positive integer, not {value!r}")
    choices = (("loss", loss, LOSSES), ("optimizer", optimizer, tuple(OPTIMIZERS)), ("schedule", schedule, SCHEDULES))
    for name, value, valid in choices:
        if value not in valid:
            raise InvalidInputError(f"unknown {name} {value!r}; valid values: {', '.join(map(repr, valid))}")
    for name, value in (("temperature", temperature), ("lr", lr), ("alpha", alpha)):
        if not (isinstance(value, int | float) and not isinstance(value, bool)) and not (name == "alpha" and value is None):
            raise InvalidInputError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    if not temperature > 0:
        raise InvalidInputError(f"temperature must be > 0, not {temperature!r}")
    if alpha is not None and not 0 <= alpha <= 1:
        raise InvalidInputError(f"alpha weights the distillation loss against the task loss; it must be in [0, 1], not {alpha!r}")
    if not lr > 0:
        raise InvalidInputError(f"lr must be > 0, not {lr!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise InvalidInputError(f"warmup_steps must be a non-negative integer, not {warmup_steps!r}")
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive integer, not {value!r}")


__all__ = ["LOSSES", "DistillConfig", "OutputKey"]
