"""Passes by name: what the API looks up in the registry of :mod:`fxcompress.pass_base`.

The built-in passes register themselves when ``fxcompress.passes`` is imported; the first lookup
imports it (the passes and their custom ops take longer to import than the rest of fxcompress).
Plug-in passes register with ``@register_pass`` wherever they are defined.
"""

from __future__ import annotations

from typing import Any

from .errors import PassConfigError, UnknownPassError
from .pass_base import REGISTRY, Pass


def registered_passes() -> dict[str, type[Pass]]:
    import fxcompress.passes  # noqa: F401  (registers the built-in passes; here, so import fxcompress stays fast)

    return dict(sorted(REGISTRY.items()))


def make_pass(spec: str | Pass | dict, **options: Any) -> Pass:
    """Turn a pass name (with options), a configured pass object or a configuration dict
    (``{"pass": name, **options}``, what ``Pass.config()`` and ``gm.pipeline`` hold) into a pass object."""
    if isinstance(spec, dict) and isinstance(spec.get("pass"), str) and not options:
        return make_pass(spec["pass"], **{k: v for k, v in spec.items() if k != "pass"})
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
    try:
        return cls(**options)
    except PassConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise PassConfigError(f"bad options for pass {spec!r}: {exc}; valid options:\n{cls.options_help()}") from exc
