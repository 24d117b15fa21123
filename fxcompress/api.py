"""The public verbs: ``optimize`` (capture + pass pipeline + report) and the default pipeline."""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from .capture import ExampleInputs, capture, check_model_and_inputs, run_eagerly
from .errors import InvalidInputError
from .instrument import Instrumentation, dumper_from_env_or
from .manager import PassManager
from .pass_base import Pass, PassContext, make_pass
from .report import Report, ReportBuilder, ReportConfig, latency_guard

DEFAULT_PASSES: tuple[str, ...] = ("eliminate_identity", "fold_bn")
"""Lossless passes that are always safe: drop eval-mode dropout/identity ops, fold BN into convs."""


def optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    passes: Sequence[str | Pass] | None = None,
    *,
    verify: bool = True,
    report: ReportConfig | bool = True,
    dump_dir: str | os.PathLike | None = None,
    instrumentations: Sequence[Instrumentation] = (),
    recover: dict | None = None,
) -> fx.GraphModule:
    """Capture ``model``, run ``passes`` (default :data:`DEFAULT_PASSES`), return a new ``GraphModule``.

    ``model`` is never mutated. ``passes`` takes names (``"fold_bn"``) or configured pass objects
    (``fxcompress.passes.FoldBN()``). The result carries ``.report`` (a :class:`Report`) and
    ``.pipeline`` (the pass configurations as plain dicts). ``dump_dir`` (or the environment variable
    ``FXCOMPRESS_DUMP_DIR``) writes the graph code before and after each pass. ``recover`` runs
    :func:`fxcompress.distill` with the original model as teacher after the pipeline, e.g.
    ``recover=dict(data=loader, steps=200)``. When the report measures latency, a result measurably
    slower than the input is said in one warning line naming the passes responsible (passes asked
    only for size, ``allow_slower=True``, are reported, not warned about).
    """
    pipeline = [make_pass(p) for p in (DEFAULT_PASSES if passes is None else _as_sequence(passes))]
    inputs = ExampleInputs.of(example_inputs)
    check_model_and_inputs(model, inputs)
    reference = run_eagerly(model, inputs)
    gm = capture(model, inputs)
    ctx = PassContext(inputs.args, inputs.kwargs)
    report_config = report if isinstance(report, ReportConfig) else ReportConfig(latency=bool(report))
    builder = ReportBuilder(reference, report_config)
    hooks = [builder, *instrumentations]
    dumper = dumper_from_env_or(dump_dir)
    if dumper is not None:
        hooks.append(dumper)
    PassManager(pipeline, verify=verify, instrumentations=hooks).run(gm, ctx)
    if recover:
        start = time.perf_counter()
        gm = _recover(gm, model, recover)
        with torch.no_grad():
            outputs = ctx.run(gm)
        builder.add_stage("recover", gm, outputs, time.perf_counter() - start, "distilled from the input model")
    if report_config.latency and report_config.guard:
        latency_guard(builder.report, size_only=tuple(p.name for p in pipeline if getattr(p, "allow_slower", False)))
    gm.report = builder.report
    gm.pipeline = [p.config() for p in pipeline]
    return gm


def _as_sequence(passes: Any) -> Sequence:
    if isinstance(passes, str | Pass):
        return [passes]
    if not isinstance(passes, list | tuple):
        raise InvalidInputError(f"passes must be a list of pass names or Pass objects, not {type(passes).__name__}")
    return passes


def _recover(student: fx.GraphModule, teacher: torch.nn.Module, options: dict) -> fx.GraphModule:
    from .distill import distill

    if "data" not in options:
        raise InvalidInputError("recover= needs at least `data` (an iterable of batches), e.g. recover=dict(data=loader, steps=100)")
    result = distill(student=student, teacher=copy.deepcopy(teacher), **options)
    return result[0] if isinstance(result, tuple) else result


__all__ = ["DEFAULT_PASSES", "Report", "ReportConfig", "optimize"]
