"""The inputs of one model call: positional ``args`` and keyword ``kwargs``.

One type for every place that holds them: the example inputs of :func:`fxcompress.optimize` and
:func:`fxcompress.capture` (:class:`Inputs`), a pass's context (:class:`fxcompress.pass_base.PassContext`:
inputs plus calibration data and analyses) and a training batch (:class:`fxcompress.training.Batch`:
inputs plus labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import InvalidInputError


@dataclass
class Inputs:
    """Positional and keyword inputs of one model call, normalised from what users pass."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs: Any) -> "Inputs":
        """A tensor (the only positional input), a tuple/list of positional inputs, a dict of keyword inputs."""
        if isinstance(example_inputs, cls):
            return example_inputs
        if isinstance(example_inputs, Inputs):
            return cls(example_inputs.args, example_inputs.kwargs)
        if isinstance(example_inputs, torch.Tensor):
            return cls((example_inputs,), {})
        if isinstance(example_inputs, dict):
            return cls((), dict(example_inputs))
        if isinstance(example_inputs, list | tuple):
            return cls(tuple(example_inputs), {})
        raise InvalidInputError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"not {type(example_inputs).__name__}; pass e.g. `(torch.randn(1, 3, 224, 224),)`"
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]

    def run(self, module: torch.nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def moved(self, device: torch.device) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with every top-level tensor on ``device``."""
        def move(value: Any) -> Any:
            return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

        return tuple(move(a) for a in self.args), {k: move(v) for k, v in self.kwargs.items()}

    def size(self) -> int:
        """Number of samples: the leading dimension of the first input tensor."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return value.shape[0]
        return 1


__all__ = ["Inputs"]
