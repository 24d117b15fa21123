"""The pass contract and the registry.

A pass is a frozen dataclass: its fields are its configuration (plain data that can be
printed, compared and saved with ``dataclasses.asdict``), ``name`` and ``lossless`` are
class attributes, and ``run`` rewrites a captured ``GraphModule`` in place and returns a
:class:`PassResult` saying what it changed and what it skipped, with reasons.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils import _pytree as pytree

from .errors import PassConfigError, UnknownPassError


@dataclass
class PassContext:
    """What a pass may read besides the graph: the example inputs it is verified on, the calibration
    data (an iterable of batches, ``None``: the example inputs) and cached analyses of the graph."""

    args: tuple
    kwargs: dict
    calibration: Any = None
    analyses: dict = field(default_factory=dict)

    def run(self, module: torch.nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]


@dataclass
class PassResult:
    """What a pass did. ``changed`` is checked by the pass manager against the graph."""

    changed: bool
    rewritten: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    def skip(self, target: str, reason: str) -> None:
        self.skipped.append((target, reason))

    def summary(self) -> str:
        return f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped"


@dataclass(frozen=True)
class Pass:
    """Base class. Subclasses are frozen dataclasses registered with :func:`register_pass`."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def config(self) -> dict:
        return {"pass": self.name, **dataclasses.asdict(self)}


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    import fxcompress.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def make_pass(spec: str | Pass, **options: Any) -> Pass:
    """Turn a pass name (with options) or a configured pass object into a pass object."""
    if isinstance(spec, Pass):
        if options:
            raise PassConfigError(f"options {sorted(options)} given with an already configured pass {spec!r}")
        return spec
    if not isinstance(spec, str):
        raise PassConfigError(f"a pass is a name or a Pass object, not {type(spec).__name__}: {spec!r}")
    passes = registered_passes()
    if spec not in passes:
        raise UnknownPassError(f"unknown pass {spec!r}; registered passes: {', '.join(passes)}")
    cls = passes[spec]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise PassConfigError(
            f"pass {spec!r} has no option(s) {unknown}; valid options: {', '.join(valid) or '(none)'}"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise PassConfigError(f"bad options for pass {spec!r}: {exc}") from exc
