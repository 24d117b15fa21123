"""The pass contract and the registry passes register into (looked up by name in :mod:`fxcompress.registry`).

A pass is a frozen dataclass: its fields are its configuration (plain data that can be
printed, compared and saved with ``dataclasses.asdict``), ``name`` and ``lossless`` are
class attributes, and ``run`` rewrites a captured ``GraphModule`` in place and returns a
:class:`PassResult` saying what it changed and what it skipped, with reasons.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from .errors import PassConfigError
from .inputs import Inputs


@dataclass
class PassContext(Inputs):
    """What a pass may read besides the graph: the example inputs it is verified on (``args``,
    ``kwargs``), the calibration data (an iterable of batches, ``None``: the example inputs) and
    cached analyses of the graph."""

    calibration: Any = None
    analyses: dict = field(default_factory=dict)


@dataclass
class PassResult:
    """What a pass did: what it rewrote, what it skipped and why, per-layer details.

    ``changed`` (``None``: ``bool(rewritten)``, filled in by the pass manager) is checked by the
    manager against the graph; a pass that modifies the graph without naming a rewrite says
    ``changed=True``.
    """

    changed: bool | None = None
    rewritten: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    def skip(self, target: str, reason: str) -> None:
        self.skipped.append((target, reason))

    def summary(self) -> str:
        return f"{len(self.rewritten)} rewritten, {len(self.skipped)} skipped"


class _PassType(type):
    """Checks a pass's options before the dataclass is built (so before the subclass's ``__post_init__``).

    Unknown keywords, too many positional arguments and values of the wrong type (read from the
    field annotations) raise :class:`PassConfigError` listing every option with its type and default.
    Ranges and combinations are the subclass's ``__post_init__``'s job.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        cls, args, kwargs = cls.config_class(args, dict(kwargs))
        check_options(cls, args, kwargs)
        return super(_PassType, cls).__call__(*args, **kwargs)


@dataclass(frozen=True)
class Pass(metaclass=_PassType):
    """Base class. Subclasses are frozen dataclasses registered with :func:`register_pass`."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        """Rewrite ``gm`` in place and say what was done; the manager cleans up (dead code,
        unused attributes, lint, recompile) and checks the result (:func:`fxcompress.manager.apply_pass`)."""
        raise NotImplementedError

    def requires(self, gm: torch.fx.GraphModule) -> None:
        """Precondition on the input graph (torch.fx ``PassBase.requires``): raise to refuse it."""

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Postcondition on the cleaned-up output graph (torch.fx ``PassBase.ensures``): raise if it does not hold."""

    @classmethod
    def config_class(cls, args: tuple, kwargs: dict) -> tuple[type, tuple, dict]:
        """The class a call ``cls(*args, **kwargs)`` builds (itself), for a thin alias to override
        (``Int8(mode=...)`` builds the mode's own config)."""
        return cls, args, kwargs

    def config(self) -> dict:
        return {"pass": self.name, **dataclasses.asdict(self)}

    @classmethod
    def options_help(cls) -> str:
        """One line per option, ``name: type = default`` (``fxcompress passes`` prints the same)."""
        hints = _type_hints(cls)
        return "\n".join(f"  {f.name}: {type_name(hints.get(f.name, Any))} = {f.default!r}" for f in _options(cls))


def _options(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not evaluate: leave its values unchecked
        return {}


def check_options(cls: type, args: tuple, kwargs: dict) -> None:
    """Raise :class:`PassConfigError` for unknown options or values that do not match the annotations."""
    fields = _options(cls)
    names = [f.name for f in fields]
    where = f"{cls.__name__} ({getattr(cls, 'name', '') or 'pass'})"
    if len(args) > len(names):
        raise PassConfigError(f"{where} takes at most {len(names)} options, {len(args)} given; valid options:\n{cls.options_help()}")
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PassConfigError(f"{where} has no option {key!r}{hint}; valid options:\n{cls.options_help()}")
    hints = _type_hints(cls)
    for key, value in {**dict(zip(names, args)), **kwargs}.items():
        hint = hints.get(key, Any)
        if not conforms(value, hint):
            raise PassConfigError(
                f"{where}: {key}={value!r} is a {type(value).__name__}, expected {type_name(hint)}; "
                f"valid options:\n{cls.options_help()}"
            )


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits annotation ``hint``; containers are checked element-wise by the pass itself."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is not None or not isinstance(hint, type):
        return True
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


REGISTRY: dict[str, type[Pass]] = {}
"""Every pass registered so far, by name; look passes up with :mod:`fxcompress.registry` (it loads the built-in ones)."""


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute `name`")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} is already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls
