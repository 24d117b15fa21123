"""The pass manager: runs a pipeline, verifies the graph after every pass, calls instrumentation.

Order of events for each pass (the hooks are :class:`fxcompress.instrument.Instrumentation`)::

    before_pass -> apply_pass -> after_run -> verification -> after_pass
                                           \\-> after_failure (any exception), then re-raised

``apply_pass`` is the part of the contract a pass does not repeat: ``requires`` → ``run`` (rewrite
and report) → clean-up if the graph changed (dead code, unused attributes, lint, recompile) →
``ensures``, as torch.fx's ``PassBase.__call__``/``PassManager`` own checks and recompilation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.fx as fx

from . import ir
from .errors import PassConfigError, VerificationError
from .instrument import Instrumentation
from .pass_base import Pass, PassContext, PassResult
from .registry import make_pass
from .quiet import quiet
from .shapes import ShapeProbe, second_shape
from .verify import GraphSnapshot, default_rtol, first_diverging_node, fidelity, output_signature


@dataclass
class PassRecord:
    """One pass as it ran: its configuration and what it reported."""

    pass_: Pass
    result: PassResult


def graph_fingerprint(gm: fx.GraphModule) -> tuple:
    """Changes whenever the graph code or any parameter/buffer (identity, shape or contents) changes."""
    state = [
        (name, tuple(t.shape), t.dtype, t.data_ptr(), t._version)
        for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    ]
    return gm.code, tuple(state)


Verify = bool | Literal["fast", "full"]
"""``"full"`` (also ``True``, the default), ``"fast"`` or ``False``; see :class:`PassManager`."""

VERIFY_LEVELS = ("full", "fast", False)


def verify_level(verify: Any) -> str | bool:
    """``True`` -> ``"full"``; anything but the three levels raises :class:`PassConfigError`."""
    level = "full" if verify is True else verify
    if level not in VERIFY_LEVELS or isinstance(level, int) and level is not False:
        raise PassConfigError(f"verify={verify!r}: use 'full' (or True), 'fast' or False")
    return level


def apply_pass(pass_: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Run one pass on ``gm`` and clean up after it; ``result.changed`` is filled in (default ``bool(rewritten)``).

    A failing ``requires``/``ensures`` hook, a result that is not a :class:`PassResult` and a graph
    the clean-up cannot lint raise :class:`VerificationError` naming the pass.
    """
    _check_condition(pass_, "requires", gm)
    result = pass_.run(gm, ctx)
    if not isinstance(result, PassResult):
        raise VerificationError(pass_.name, f"run() returned {type(result).__name__}, not a PassResult")
    if result.changed is None:
        result.changed = bool(result.rewritten)
    if result.changed:
        try:
            ir.finalize(gm)
        except Exception as exc:
            raise VerificationError(pass_.name, f"the graph is malformed: {exc}") from exc
    _check_condition(pass_, "ensures", gm)
    return result


def _check_condition(pass_: Pass, hook: str, gm: fx.GraphModule) -> None:
    try:
        getattr(pass_, hook)(gm)
    except Exception as exc:
        raise VerificationError(pass_.name, f"{hook}() failed: {type(exc).__name__}: {exc}") from exc


class PassManager:
    """Run ``passes`` in order on a captured graph, verifying after each one.

    ``verify="full"`` (or ``True``, the default): the graph lints, recompiles and runs on the example inputs; the output
    structure, shapes and dtypes are unchanged; a lossless pass reproduces the pre-pass outputs
    within ``rtol`` (default by dtype: 1e-5 for fp32) of max|output|. The run, structure and lossless
    checks are repeated at a second shape (``self.probe``: the example inputs resized along every
    dynamic dim, within its captured range), so a pass that bakes an example size into the graph
    fails where it is written; a pass that reports
    ``changed=False`` left the graph and its weights untouched. The first failure raises
    :class:`VerificationError` naming the pass (and, for numerical divergence, the first
    diverging node). ``verify="fast"``: all of that except the second shape (one model run per pass).
    ``verify=False``: only the ``changed=False`` check; the model still runs once per pass for the
    instrumentation (the report).

    Cost per pass: the reference is the previous pass's outputs (kept, never recomputed), and the
    pre-pass graph of a lossless pass is kept as a :class:`GraphSnapshot` (graph nodes only, weights
    shared), replayed only when the lossless check fails, to name the first diverging node. No weight
    is copied; a lossy pass keeps no snapshot, so the weights it replaces are freed before verification.
    """

    def __init__(
        self,
        passes: Sequence[str | Pass],
        *,
        verify: Verify = True,
        rtol: float | None = None,
        instrumentations: Sequence[Instrumentation] = (),
    ):
        self.passes = [make_pass(p) for p in passes]
        self.verify = verify_level(verify)
        self.rtol = rtol
        self.instrumentations = list(instrumentations)
        self.probe: ShapeProbe | None = None

    @quiet
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[PassRecord]:
        outputs = self._run_model(gm, ctx)
        self.probe = second_shape(gm, ctx.args, ctx.kwargs, lambda a, k: _run_at(gm, a, k)) if self.verify == "full" else None
        for inst in self.instrumentations:
            inst.on_start(gm, ctx, outputs)
        records = []
        for index, pass_ in enumerate(self.passes):
            for inst in self.instrumentations:
                inst.before_pass(index, pass_, gm)
            try:
                outputs = self._run_one(index, pass_, gm, ctx, outputs, records)
            except Exception as exc:
                for inst in self.instrumentations:
                    inst.after_failure(index, pass_, gm, exc)
                raise
        return records

    def _run_one(self, index, pass_, gm, ctx, outputs, records):
        snapshot = GraphSnapshot.of(gm) if self.verify and pass_.lossless else None  # lossy: nothing to replay
        fingerprint = graph_fingerprint(gm)
        result = apply_pass(pass_, gm, ctx)
        for inst in self.instrumentations:
            inst.after_run(index, pass_, gm, result)
        if not result.changed and graph_fingerprint(gm) != fingerprint:
            raise VerificationError(pass_.name, "the pass reported changed=False but modified the graph or its weights")
        new_outputs = self._verify(pass_, gm, ctx, outputs, snapshot) if self.verify else self._run_model(gm, ctx)
        records.append(PassRecord(pass_, result))
        for inst in self.instrumentations:
            inst.after_pass(index, pass_, gm, result, new_outputs)
        return new_outputs

    @staticmethod
    def _run_model(gm: torch.nn.Module, ctx: PassContext) -> Any:
        return _run_at(gm, ctx.args, ctx.kwargs)

    def _verify(self, pass_: Pass, gm: fx.GraphModule, ctx: PassContext, before: Any, snapshot: GraphSnapshot | None) -> Any:
        try:
            gm.graph.lint()
            gm.recompile()
        except Exception as exc:
            raise VerificationError(pass_.name, f"the graph is malformed: {exc}") from exc
        try:
            after = self._run_model(gm, ctx)
        except Exception as exc:
            raise VerificationError(pass_.name, f"the rewritten graph fails to run: {type(exc).__name__}: {exc}") from exc
        old_sig, new_sig = output_signature(before), output_signature(after)
        if old_sig != new_sig:
            raise VerificationError(pass_.name, f"output structure/shape/dtype changed from {old_sig} to {new_sig}")
        if pass_.lossless:
            rtol = self.rtol if self.rtol is not None else default_rtol(before)
            error = fidelity(before, after)
            if not error.max_rel_err <= rtol:
                node = _diverging_node(snapshot, gm, ctx.args, ctx.kwargs, rtol)
                raise VerificationError(
                    pass_.name,
                    f"the pass claims to be lossless but changed the outputs: max relative error "
                    f"{error.max_rel_err:.3g} > {rtol:g}",
                    node=node,
                )
        if self.probe is not None:
            self._verify_second_shape(pass_, gm, snapshot)
        return after

    def _verify_second_shape(self, pass_: Pass, gm: fx.GraphModule, snapshot: GraphSnapshot | None) -> None:
        probe = self.probe
        where = f"at a second shape ({probe.description})"
        hint = "; a size of the example inputs is probably baked into the graph instead of read from the input"
        try:
            after = _run_at(gm, probe.args, probe.kwargs)
        except Exception as exc:
            raise VerificationError(pass_.name, f"the rewritten graph fails to run {where}: {type(exc).__name__}: {exc}{hint}") from exc
        old_sig, new_sig = output_signature(probe.outputs), output_signature(after)
        if old_sig != new_sig:
            raise VerificationError(pass_.name, f"output structure/shape/dtype {where} changed from {old_sig} to {new_sig}{hint}")
        if pass_.lossless:
            rtol = self.rtol if self.rtol is not None else default_rtol(probe.outputs)
            error = fidelity(probe.outputs, after)
            if not error.max_rel_err <= rtol:
                node = _diverging_node(snapshot, gm, probe.args, probe.kwargs, rtol)
                raise VerificationError(
                    pass_.name, f"the pass claims to be lossless but changed the outputs {where}: max relative error "
                    f"{error.max_rel_err:.3g} > {rtol:g}{hint}", node=node,
                )
        probe.outputs = after


def _diverging_node(snapshot: GraphSnapshot, gm: fx.GraphModule, args: tuple, kwargs: dict, rtol: float) -> str | None:
    """The first node of ``gm`` whose value differs from the pre-pass graph's; when the pass wrote weights
    in place (the snapshot shares them, so replaying it cannot show that), the first node reading one."""
    written = {id(t) for t in snapshot.written_in_place()}
    if written:
        sources = {n for n in gm.graph.nodes if n.op == "get_attr" and id(ir.get_attr(gm, n.target)) in written}
        return next((n.name for n in gm.graph.nodes if any(a in sources for a in n.all_input_nodes)), None)
    return first_diverging_node(snapshot.module, gm, args, kwargs, rtol)


def _run_at(gm: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return gm(*args, **kwargs)
