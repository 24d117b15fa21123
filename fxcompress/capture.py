"""Capture: user model + example inputs -> the canonical IR (an ATen-level ``GraphModule``).

The IR is what ``torch.export.export(model, args, kwargs, strict=False).module()`` returns:
parameters and buffers as ``get_attr`` nodes, ops as ``torch.ops.aten.*`` overloads with
fake-tensor shapes in ``node.meta["val"]``, and the model's input/output pytree structure
(dicts, HF ``ModelOutput``) restored around the flat graph.
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import CaptureError, FxCompressWarning, InferenceOnlyError, InvalidInputError
from .hf import cache_hint, without_kv_cache
from .inputs import Inputs
from .quiet import quiet, stderr_kept_on_success, third_party_quiet
from .shapes import EXPORT, PINNED, auto_dynamic_shapes, install_guard_errors, summarize, widen_size_one
from .verify import default_rtol, fidelity, output_signature

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_model_and_inputs(model: torch.nn.Module, inputs: Inputs) -> None:
    """Reject models and inputs fxcompress cannot handle, with the cause and the fix."""
    if not isinstance(model, torch.nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    tensors = inputs.tensors()
    if not tensors:
        raise InvalidInputError("example_inputs contain no tensor; pass at least one input tensor")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.dtype not in SUPPORTED_DTYPES:
            raise InvalidInputError(
                f"parameter/buffer {name!r} has dtype {p.dtype}; supported: float32, float16, bfloat16. "
                f"Convert the model first, e.g. `model.float()`"
            )
    devices = {t.device for t in tensors} | {p.device for p in model.parameters()}
    if len(devices) > 1:
        raise InvalidInputError(
            f"model and example inputs are on different devices {sorted(map(str, devices))}; "
            f"move them to one device, e.g. `model.to(x.device)`"
        )
    device = devices.pop()
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device {device} is not supported; use a CPU or CUDA device")


def eval_copy(model: torch.nn.Module, *, warn: bool = True) -> torch.nn.Module:
    """A deep copy of ``model`` in eval mode; the user's model (weights, buffers, flags, hooks) is untouched.

    A model in training mode is captured in eval mode — BatchNorm uses its running statistics,
    dropout is off — with one :class:`FxCompressWarning` (``model.eval()`` first silences it).
    """
    if warn and any(m.training for m in model.modules()):
        warnings.warn(
            "fxcompress: the model is in training mode; it is captured in eval mode (BatchNorm running "
            "statistics, no dropout). Call model.eval() first to silence this.",
            FxCompressWarning, stacklevel=4,  # the user's call (through the @quiet wrapper)
        )
    return without_kv_cache(copy.deepcopy(model).eval(), warn=warn)


def inference_only(gm: torch.nn.Module) -> torch.nn.Module:
    """Make ``eval()``/``train(False)`` no-ops returning ``gm`` on a captured graph, ``train(True)`` a clear error.

    ``torch.export``'s module raises ``NotImplementedError`` for both; the captured graph has eval
    semantics baked in (BatchNorm statistics, dropout removed), so only eval mode is meaningful.
    """

    def train(self, mode: bool = True):
        if mode:
            raise InferenceOnlyError(
                "this model is a captured inference graph (BatchNorm uses running statistics, dropout is "
                "removed), so train() cannot switch it to training behaviour. To fine-tune its weights use "
                "fxcompress.distill(compressed, teacher, data, steps=...) — no train() call needed — or train "
                "the original nn.Module and optimize it again."
            )
        return self

    def eval(self):
        return self

    gm.train = types.MethodType(train, gm)
    gm.eval = types.MethodType(eval, gm)
    return gm


def run_eagerly(model: torch.nn.Module, inputs: Inputs) -> Any:
    """Run the model once on the example inputs; a failure means the inputs are wrong for it."""
    try:
        with torch.no_grad():
            return inputs.run(model)
    except Exception as exc:  # the user's forward can raise anything
        raise InvalidInputError(
            f"the model does not run on the given example inputs: {type(exc).__name__}: {exc}. "
            f"Pass inputs the model accepts: a tuple of positional inputs or a dict of keyword inputs"
        ) from exc


class _ModuleTracker:
    """Forward pre/post hooks that remember which submodule was running when capture failed."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave()))

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append(f"{name or '<root>'} ({type(module).__name__})")

        return hook

    def _leave(self):
        def hook(module, args, output):
            if self.stack:
                self.stack.pop()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class _Attempt:
    """One way to call export: on which inputs, with which ``dynamic_shapes``, and what a static dim then means."""

    inputs: Inputs
    dynamic_shapes: Any
    widened: list[str] = field(default_factory=list)
    static_kind: str = ""
    static_reason: str = ""


@quiet
def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True, dynamic_shapes: Any = None) -> fx.GraphModule:
    """Capture ``model`` as the canonical ATen-level ``GraphModule``; ``model`` is never mutated.

    By default every dim of every input tensor is ``Dim.AUTO``: export keeps it symbolic unless the
    model's code fixes it. Size-1 dims (which export would specialize) are widened to 2 for export
    when the model accepts that, and the graph is then checked on the original example. A model that
    cannot be captured dynamic falls back to static shapes. ``dynamic=False`` pins every dim;
    ``dynamic_shapes=`` goes to ``torch.export.export`` as is. ``gm.meta["fxcompress_shapes"]`` (a
    :class:`fxcompress.shapes.ShapeSummary`) lists the dynamic dims and why each static one is static;
    a call whose shapes the graph does not accept raises :class:`InputShapeError` saying so.

    The capture runs on an eval-mode copy (see :func:`eval_copy`); the result is inference-only
    (see :func:`inference_only`).
    """
    inputs = Inputs.of(example_inputs)
    check_model_and_inputs(model, inputs)
    model = eval_copy(model)
    return capture_owned(model, inputs, run_eagerly(model, inputs), dynamic=dynamic, dynamic_shapes=dynamic_shapes)


def capture_owned(model: torch.nn.Module, inputs: Inputs, reference: Any, *, dynamic: bool = True,
                  dynamic_shapes: Any = None) -> fx.GraphModule:
    """:func:`capture` of a model the caller owns (an :func:`eval_copy`, ``reference`` its outputs on
    ``inputs``): the graph shares that model's tensors, so capture makes no copy of its own — the
    caller must not train or mutate ``model`` afterwards."""
    if dynamic_shapes is not None and not dynamic:
        raise InvalidInputError("pass either dynamic=False (all shapes static) or dynamic_shapes=..., not both")
    failure = None
    for attempt in _attempts(model, inputs, dynamic, dynamic_shapes):
        if attempt.static_kind == EXPORT and failure is not None:
            attempt.static_reason = f"{attempt.static_reason} ({_first_line(failure[1])})"
        tracker = _ModuleTracker(model)
        args, kwargs = _unmarked(attempt.inputs)
        try:
            with torch.no_grad(), _quiet_export():
                program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=attempt.dynamic_shapes)
        except Exception as exc:
            failure = (tracker.stack[-1] if tracker.stack else "<root>", exc)
            continue
        finally:
            tracker.remove()
        gm = inference_only(program.module())
        if not attempt.widened or _reproduces(gm, inputs, reference):
            break
    else:
        raise CaptureError(_capture_message(*failure)) from failure[1]
    summary = summarize(gm, inputs.args, inputs.kwargs, attempt.static_kind, attempt.static_reason, attempt.widened)
    install_guard_errors(gm, summary)
    gm.meta["fxcompress_shapes"] = summary
    gm.meta["fxcompress_example_inputs"] = inputs
    gm.meta["fxcompress_export_inputs"] = attempt.inputs
    return gm


def _attempts(model: torch.nn.Module, inputs: Inputs, dynamic: bool, dynamic_shapes: Any):
    """Export calls to try in order (lazily: widened examples are only built and run when reached)."""
    if dynamic_shapes is not None:
        yield _Attempt(inputs, dynamic_shapes, static_kind=PINNED, static_reason="static in the given dynamic_shapes")
        return
    if not dynamic:
        yield _Attempt(inputs, None, static_kind=PINNED, static_reason="pinned by dynamic=False")
        return
    examples = []  # (inputs, widened dims): the widened ones first, built lazily
    for batch_only in (False, True):
        args, kwargs, widened = widen_size_one(model, inputs.args, inputs.kwargs, batch_only)
        if widened and widened not in [w for _, w in examples] and _runs(model, args, kwargs):
            examples.append((Inputs(args, kwargs), widened))
            yield _Attempt(examples[-1][0], auto_dynamic_shapes(model, args, kwargs), widened)
    yield _Attempt(inputs, auto_dynamic_shapes(model, inputs.args, inputs.kwargs))
    # every dim dynamic failed (e.g. sympy cannot solve a spatial dim's guards through adaptive pooling):
    # keep the batch dynamic, the other dims at the example's sizes, before giving up on dynamic shapes
    if any(t.ndim > 1 for t in inputs.tensors()):
        for example, widened in [*examples, (inputs, [])]:
            yield _Attempt(example, auto_dynamic_shapes(model, example.args, example.kwargs, dims_of=lambda name, t: [0]),
                           widened, EXPORT, "static: the capture with every dim dynamic failed, so only dim 0 is dynamic")
    yield _Attempt(inputs, None, static_kind=EXPORT, static_reason="static: dynamic capture failed")


def _unmarked(inputs: Inputs) -> tuple[tuple, dict]:
    """The inputs as new tensor objects over the same storage, for one export call: ``Dim.AUTO`` marks
    the tensors export is given (``_dynamo_weak_dynamic_indices``, left there when export fails), and a
    marked tensor is traced dynamic again by the next, static attempt — and the user's tensors would keep
    the marks."""
    def alias(value: Any) -> Any:
        return value.detach() if isinstance(value, torch.Tensor) else value
    return pytree.tree_map(alias, inputs.args), pytree.tree_map(alias, inputs.kwargs)


def _runs(model: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    try:
        with torch.no_grad():
            model(*args, **kwargs)
        return True
    except Exception:  # the model does not accept the widened example: capture at the user's sizes
        return False


def _reproduces(gm: fx.GraphModule, inputs: Inputs, reference: Any) -> bool:
    """A graph captured on a widened example must give the model's outputs on the original one."""
    try:
        with torch.no_grad():
            outputs = inputs.run(gm)
    except Exception:  # e.g. a guard the widened example created: fall back to the original example
        return False
    return output_signature(outputs) == output_signature(reference) and fidelity(reference, outputs).max_rel_err <= default_rtol(reference)


@contextlib.contextmanager
def _quiet_export():
    with third_party_quiet(), stderr_kept_on_success():
        yield


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}" if str(exc).strip() else type(exc).__name__


def _capture_message(failed_in: str, exc: Exception) -> str:
    return (
        f"could not capture the model: torch.export failed inside module {failed_in}: {_first_line(exc)}{cache_hint(exc)}\n"
        "What you can do: make that module's forward traceable (no data-dependent Python control "
        "flow on tensor values — use torch.where/torch.cond; no .item()/.tolist() on traced tensors; "
        "no in-place assignment into inputs), or wrap it as a torch.library custom op so it is kept "
        "as one opaque node, or capture a submodule that excludes it."
    )
