"""Capture: user model + example inputs -> the canonical IR (an ATen-level ``GraphModule``).

The IR is what ``torch.export.export(model, args, kwargs, strict=False).module()`` returns:
parameters and buffers as ``get_attr`` nodes, ops as ``torch.ops.aten.*`` overloads with
fake-tensor shapes in ``node.meta["val"]``, and the model's input/output pytree structure
(dicts, HF ``ModelOutput``) restored around the flat graph.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import CaptureError, FxCompressWarning, InferenceOnlyError, InvalidInputError
from .hf import cache_hint, without_kv_cache
from .quiet import quiet, stderr_kept_on_success, third_party_quiet

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class ExampleInputs:
    """Positional and keyword example inputs, normalised from what users pass."""

    args: tuple
    kwargs: dict

    @classmethod
    def of(cls, example_inputs: Any) -> "ExampleInputs":
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if isinstance(example_inputs, torch.Tensor):
            return cls((example_inputs,), {})
        if isinstance(example_inputs, dict):
            return cls((), dict(example_inputs))
        if isinstance(example_inputs, list | tuple):
            return cls(tuple(example_inputs), {})
        raise InvalidInputError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"not {type(example_inputs).__name__}; pass e.g. `(torch.randn(1, 3, 224, 224),)`"
        )

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]

    def batch_dynamic_shapes(self, model: torch.nn.Module) -> dict:
        """``dynamic_shapes`` (by forward-argument name) marking dim 0 of every input tensor dynamic."""

        def spec(leaf: Any) -> Any:
            return {0: Dim.AUTO} if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 else None

        bound = inspect.signature(model.forward).bind(*self.args, **self.kwargs)
        return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}

    def run(self, module: torch.nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


def check_model_and_inputs(model: torch.nn.Module, inputs: ExampleInputs) -> None:
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


def run_eagerly(model: torch.nn.Module, inputs: ExampleInputs) -> Any:
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


@quiet
def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic_batch: bool = True) -> fx.GraphModule:
    """Capture ``model`` as the canonical ATen-level ``GraphModule``; ``model`` is never mutated.

    The capture runs on an eval-mode copy (see :func:`eval_copy`); the result is inference-only
    (see :func:`inference_only`).

    With ``dynamic_batch`` the batch dimension stays symbolic where the model allows it, so the
    captured graph runs at other batch sizes too; a model that needs a fixed batch falls back to
    static shapes.
    """
    inputs = ExampleInputs.of(example_inputs)
    check_model_and_inputs(model, inputs)
    model = eval_copy(model)
    run_eagerly(model, inputs)
    attempts = [inputs.batch_dynamic_shapes(model), None] if dynamic_batch else [None]
    for i, dynamic_shapes in enumerate(attempts):
        tracker = _ModuleTracker(model)
        try:
            with torch.no_grad(), _quiet_export():
                program = torch.export.export(
                    model, inputs.args, inputs.kwargs, strict=False, dynamic_shapes=dynamic_shapes
                )
            break
        except Exception as exc:
            failed_in = tracker.stack[-1] if tracker.stack else "<root>"
            if i + 1 < len(attempts):
                continue
            raise CaptureError(_capture_message(failed_in, exc)) from exc
        finally:
            tracker.remove()
    gm = inference_only(program.module())
    gm.meta["fxcompress_dynamic_batch"] = dynamic_shapes is not None
    gm.meta["fxcompress_example_inputs"] = inputs
    return gm


@contextlib.contextmanager
def _quiet_export():
    with third_party_quiet(), stderr_kept_on_success():
        yield


def _capture_message(failed_in: str, exc: Exception) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"could not capture the model: torch.export failed inside module {failed_in}: "
        f"{type(exc).__name__}: {first_line}{cache_hint(exc)}\n"
        "What you can do: make that module's forward traceable (no data-dependent Python control "
        "flow on tensor values — use torch.where/torch.cond; no .item()/.tolist() on traced tensors; "
        "no in-place assignment into inputs), or wrap it as a torch.library custom op so it is kept "
        "as one opaque node, or capture a submodule that excludes it."
    )
