"""The public verbs: ``optimize`` (capture + pass pipeline + report) and the default pipeline."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from .capture import capture_owned, check_model_and_inputs, eval_copy, run_eagerly
from .distill import RUN_OPTIONS, distill
from .distill_config import DistillConfig
from .errors import InvalidInputError
from .inputs import Inputs
from .instrument import Instrumentation, PassProgress, dumper_from_env_or
from .manager import PassManager
from .pass_base import Pass, PassContext
from .quiet import progress_bar, quiet
from .registry import make_pass
from .report import Report, ReportBuilder, ReportConfig, latency_guard, report_config
from .search import Target, search
from .statistics import check_calibration

DEFAULT_PASSES: tuple[str, ...] = ("eliminate_identity", "fold_bn")
"""Lossless passes that are always safe: drop eval-mode dropout/identity ops, fold BN into convs."""


@quiet
def optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    passes: Sequence[str | Pass] | None = None,
    *,
    verify: bool | str = True,
    report: ReportConfig | bool = True,
    dump_dir: str | os.PathLike | None = None,
    instrumentations: Sequence[Instrumentation] = (),
    recover: DistillConfig | dict | None = None,
    recover_data: Any = None,
    calibration: Any = None,
    progress: bool | None = None,
    dynamic: bool = True,
    dynamic_shapes: Any = None,
    target: Any = None,
) -> fx.GraphModule:
    """Capture ``model``, run ``passes`` (default :data:`DEFAULT_PASSES`), return a new ``GraphModule``.

    ``model`` is never mutated. ``passes`` takes names (``"fold_bn"``) or configured pass objects
    (``fxcompress.passes.FoldBN()``). The result carries ``.report`` (a :class:`Report`) and
    ``.pipeline`` (the pass configurations as plain dicts). ``dump_dir`` (or the environment variable
    ``FXCOMPRESS_DUMP_DIR``) writes the graph code before and after each pass. ``recover`` runs
    :func:`fxcompress.distill` with the original model as teacher after the pipeline on ``recover_data``, e.g.
    ``recover=DistillConfig(steps=200), recover_data=loader`` (the older ``recover=dict(data=loader,
    steps=200)`` is an alias: ``data`` plus :func:`fxcompress.distill`'s keywords). ``calibration`` (a DataLoader or list of batches: tensors,
    tuples, dicts; labels are ignored) is what data-aware passes (``LowRank(whiten=...)``,
    ``PruneChannels(importance="activation", compensate=...)``, ``Int8(gptq=True)``) measure their input
    statistics on, in one streaming pass per analysis; without it they use the example inputs.
    A model in training mode is captured in eval mode with one :class:`FxCompressWarning`. ``progress`` (default: on when stderr is a terminal, see
    :mod:`fxcompress.quiet`) shows a bar over capture, the passes and recovery.

    The result is an inference graph: ``eval()`` is a no-op, ``train()`` raises
    :class:`InferenceOnlyError` (fine-tune with :func:`fxcompress.distill`).
    When the report measures latency, a result measurably slower than the input is said in one
    warning line naming the passes responsible (passes asked only for size, ``allow_slower=True``, are
    reported, not warned about).

    Every input dim stays dynamic unless the model's code fixes it (``dynamic=False`` pins all,
    ``dynamic_shapes=`` is passed to ``torch.export``); ``report.shapes`` lists the dynamic dims, why
    each static dim is static, and the second shape every pass was also verified at.

    ``target`` (a :class:`fxcompress.Target`, e.g. ``Target(latency=0.5, max_error=0.01)``) searches
    for the pipeline instead of taking ``passes``: the least-error mix of per-group pruning, per-layer
    rank and per-layer int8 that meets the budget on this machine (:mod:`fxcompress.search`). The
    result's ``.search`` holds every measured candidate (the Pareto report) and the chosen pipeline.

    ``verify``: ``"full"`` (or ``True``) checks after every pass that the graph lints and runs, keeps
    its output structure/shapes/dtypes, reproduces the pre-pass outputs if the pass is lossless, and
    does all of that again at a second input shape; ``"fast"`` skips the second shape; ``False``
    checks nothing (see :class:`fxcompress.PassManager`).
    """
    if target is not None:
        return _optimize_for_target(model, example_inputs, passes, target, calibration=calibration, verify=verify,
                                    report=report, dump_dir=dump_dir, instrumentations=instrumentations, recover=recover,
                                    recover_data=recover_data, progress=progress, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
    pipeline = [make_pass(p) for p in (DEFAULT_PASSES if passes is None else _as_sequence(passes))]
    inputs = Inputs.of(example_inputs)
    check_model_and_inputs(model, inputs)
    teacher = eval_copy(model, warn=False) if recover else None  # distillation trains the graph's tensors: the teacher has its own
    model = eval_copy(model)
    with progress_bar(progress, total=len(pipeline) + 1 + bool(recover), desc="fxcompress", unit="step") as bar:
        bar.set_postfix_str("capture")
        reference = run_eagerly(model, inputs)
        gm = capture_owned(model, inputs, reference, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
        del model  # the graph owns its tensors now; a pass that replaces one frees the old one
        bar.update(1)
        ctx = PassContext(inputs.args, inputs.kwargs, calibration=check_calibration(calibration))
        config = report_config(report)
        builder = ReportBuilder(reference, config)
        hooks = [builder, *instrumentations, PassProgress(bar)]
        dumper = dumper_from_env_or(dump_dir)
        if dumper is not None:
            hooks.append(dumper)
        manager = PassManager(pipeline, verify=verify, instrumentations=hooks)
        manager.run(gm, ctx)
        shapes = gm.meta["fxcompress_shapes"]
        shapes.second_shape = manager.probe.description if manager.probe is not None else None
        if recover:
            bar.set_postfix_str("recover")
            start = time.perf_counter()
            gm = _recover(gm, teacher, recover, recover_data, progress)
            with torch.no_grad():
                outputs = ctx.run(gm)
            builder.add_stage("recover", gm, outputs, time.perf_counter() - start, "distilled from the input model")
            bar.update(1)
    builder.report.shapes = shapes
    if config.latency and config.guard:
        latency_guard(builder.report, size_only=tuple(p.name for p in pipeline if getattr(p, "allow_slower", False)))
    gm.report = builder.report
    gm.pipeline = [p.config() for p in pipeline]
    return gm


def _optimize_for_target(model, example_inputs, passes, target, **options) -> fx.GraphModule:
    if not isinstance(target, Target):
        raise InvalidInputError(f"target= takes a fxcompress.Target, e.g. Target(latency=0.5), not {type(target).__name__}")
    if passes is not None:
        raise InvalidInputError("give passes= or target=, not both: with target= the search chooses the passes")
    if options["calibration"] is None and target.calibration is not None:
        options["calibration"] = target.calibration
    found = search(model, example_inputs, target, progress=options["progress"])
    gm = optimize(model, example_inputs, found.pipeline, **options)
    gm.search = found
    return gm


def _as_sequence(passes: Any) -> Sequence:
    if isinstance(passes, str | Pass):
        return [passes]
    if not isinstance(passes, list | tuple):
        raise InvalidInputError(
            f"passes must be a list of pass names or Pass objects, not {type(passes).__name__}; "
            f"e.g. passes=['fold_bn', fxcompress.passes.PruneChannels(ratio=0.5)] (`fxcompress passes` lists them)"
        )
    return passes


def _recover(student: fx.GraphModule, teacher: torch.nn.Module, recover: DistillConfig | dict, data: Any,
             progress: bool | None) -> fx.GraphModule:
    run_options: dict = {"progress": progress}
    if isinstance(recover, dict):  # the alias: data and distill's keywords in one dict
        options = dict(recover)
        if "data" not in options:
            raise InvalidInputError("recover= needs at least `data` (an iterable of batches), e.g. recover=dict(data=loader, steps=100)")
        data = options.pop("data")
        run_options.update({k: options.pop(k) for k in RUN_OPTIONS if k in options})
        recover = DistillConfig.of(options, where="recover=")
    elif not isinstance(recover, DistillConfig):
        raise InvalidInputError(f"recover= takes a fxcompress.DistillConfig (or a dict of distill's options), not {type(recover).__name__}")
    elif data is None:
        raise InvalidInputError("recover=DistillConfig(...) trains on recover_data=; pass the batches, e.g. recover_data=loader")
    return distill(student, teacher, data, recover, **run_options).student


__all__ = ["DEFAULT_PASSES", "Report", "ReportConfig", "optimize"]
