"""Quiet and progress: third-party noise the user cannot act on is filtered where fxcompress triggers it,
and long steps show a progress bar on a terminal only.

``progress=None`` (the default everywhere) means "on when stderr is a terminal"; the environment
variable ``FXCOMPRESS_PROGRESS`` (``1``/``0``) overrides the default, an explicit ``progress=`` wins.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import warnings
from typing import Any, Callable, Iterator

# Deprecations inside torch that fire when fxcompress deep-copies or re-exports a graph.
_THIRD_PARTY_WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\).*"),
)
# Loggers that print tracebacks or internals before an error fxcompress re-raises in one line.
_NOISY_LOGGERS = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def third_party_quiet() -> Iterator[None]:
    """Filter the warnings in ``_THIRD_PARTY_WARNINGS`` and quiet the loggers in ``_NOISY_LOGGERS``."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category, message in _THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def quiet(function: Callable) -> Callable:
    """Decorator form of :func:`third_party_quiet` for public entry points."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with third_party_quiet():
            return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def stderr_kept_on_success() -> Iterator[None]:
    """Buffer what is printed to stderr; replay it if the block succeeds, drop it if it raises.

    ``torch.export`` prints the partial graph to stderr before raising; the :class:`CaptureError`
    that follows names the cause and the fix, so the listing is dropped.
    """
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        yield
    sys.stderr.write(buffer.getvalue())


def progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    env = os.environ.get("FXCOMPRESS_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("", "0", "false", "no")
    return sys.stderr.isatty()


def progress_bar(progress: bool | None, **kwargs: Any):
    """A ``tqdm`` bar on stderr, disabled unless :func:`progress_enabled`."""
    from tqdm.auto import tqdm  # here: tqdm.auto probes for Jupyter, which import fxcompress need not pay

    return tqdm(disable=not progress_enabled(progress), file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)
