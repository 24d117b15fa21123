"""Module selectors: the one syntax ``Int8(skip=)``, ``PruneChannels(ignore=)`` and ``LowRank(include=, ignore=)`` use.

A selector names a module by its dotted path (``"encoder.layer.0.attention"``) and selects that
module **and everything under it**: ``skip=["pooler"]`` covers ``pooler.dense``. It may be a glob:

* ``*`` matches any characters within one path segment (``"layer*"`` matches ``layer1``, not ``layer1.0``),
* ``?`` matches one character within a segment, ``[abc]`` one of the listed characters,
* ``**`` matches across segments (``"**.dense"`` matches ``pooler.dense`` and ``encoder.layer.0.output.dense``).

The whole selector must match a leading run of segments: ``"output.dense"`` does not select
``encoder.layer.0.output.dense`` (write ``"**.output.dense"``), and ``"encoder.layer.*.output.dense"``
does not select ``encoder.layer.0.attention.output.dense``.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

from .errors import PassConfigError


@functools.lru_cache(maxsize=1024)
def _compile(selector: str) -> re.Pattern:
    parts, i = [], 0
    while i < len(selector):
        if selector.startswith("**", i):
            parts.append(".*")
            i += 2
            continue
        char = selector[i]
        close = selector.find("]", i + 2) if char == "[" else -1
        if char == "*":
            parts.append(r"[^.]*")
        elif char == "?":
            parts.append(r"[^.]")
        elif close != -1:
            body = selector[i + 1:close]
            parts.append("[" + ("^" + re.escape(body[1:]) if body[0] == "!" else re.escape(body)) + "]")
            i = close
        else:
            parts.append(re.escape(char))
        i += 1
    return re.compile("".join(parts) + r"(?:\..*)?", re.DOTALL)


def selects(selector: str, name: str) -> bool:
    """Whether ``selector`` selects the module (or parameter) path ``name``."""
    return _compile(selector).fullmatch(name) is not None


def first_match(selectors: Iterable[str], name: str) -> str | None:
    """The first of ``selectors`` that selects ``name`` (``None`` if none does)."""
    return next((s for s in selectors if selects(s, name)), None)


def check_selectors(value: object, option: str) -> tuple[str, ...]:
    """``value`` as a tuple of selectors (a single string is one selector); a clear error otherwise."""
    selectors = (value,) if isinstance(value, str) else value
    if not isinstance(selectors, list | tuple) or not all(isinstance(s, str) and s for s in selectors):
        raise PassConfigError(
            f"{option} takes module names or globs (non-empty strings), e.g. {option}=['classifier', 'layer4.*'], "
            f"not {value!r}; see fxcompress.selectors for the syntax"
        )
    return tuple(selectors)


__all__ = ["check_selectors", "first_match", "selects"]
