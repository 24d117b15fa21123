"""What several searches on one model share in the process: its capture, its analysis, built candidates.

A benchmark (or a user) asking for latency 0.7, 0.5 and 0.35 of one model runs three searches; the
capture, the lossless base graph, the sensitivity analysis, the cost model and every pipeline built
and measured so far do not depend on the budget, so the second and third search reuse them. Entries
are keyed by content (:func:`content_digest`): the model object, its class, ``repr`` and tensors, the
example inputs, the calibration batches and the search space. A model mutated in place (new weights)
gets a new key; a change that neither its tensors nor its ``repr`` show (a plain attribute its
``forward`` reads) is not seen, and such a model should be passed as a new object.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Hashable

import torch
import torch.fx as fx

from ..training import Batch

CACHE_SIZE = 4


class ProcessCache:
    """A small dict cache (oldest out first) of values computed once per key."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self.entries: dict[Hashable, Any] = {}

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key not in self.entries:
            while len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            self.entries[key] = compute()
        return self.entries[key]

    def clear(self) -> None:
        self.entries.clear()


CAPTURES = ProcessCache()
ANALYSES = ProcessCache()


def model_digest(model: torch.nn.Module, *inputs: Any) -> str:
    """The identity of a model for :data:`CAPTURES`: the object, its class, ``repr``, tensors and inputs."""
    state = sorted(model.state_dict(keep_vars=False).items())
    return content_digest(id(model), type(model).__qualname__, repr(model), state, *inputs)


def content_digest(*parts: Any) -> str:
    """A digest of graphs (code and tensors), tensors, batches and plain values."""
    digest = hashlib.sha1()

    def feed(value: Any) -> None:
        if isinstance(value, fx.GraphModule):
            digest.update(value.code.encode())
            feed(sorted(value.state_dict(keep_vars=False).items()))
        elif isinstance(value, torch.Tensor):
            digest.update(str((tuple(value.shape), value.dtype)).encode())
            digest.update(value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Batch):
            feed(value.args)
            feed(sorted(value.kwargs.items()))
        elif isinstance(value, dict):
            feed(sorted(value.items()))
        elif isinstance(value, list | tuple):
            for v in value:
                feed(v)
        else:
            digest.update(repr(value).encode())

    for part in parts:
        feed(part)
    return digest.hexdigest()
