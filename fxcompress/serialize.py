"""Save/load compressed models as torch.export ``.pt2`` archives (no pickle of Python objects)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.fx as fx

from .capture import ExampleInputs, capture
from .errors import InvalidInputError
from .shapes import ShapeSummary, auto_dynamic_shapes, input_names, install_guard_errors, placeholders, summarize

METADATA_FILE = "fxcompress.json"


def save(model: fx.GraphModule, path: str | os.PathLike, example_inputs: Any = None) -> None:
    """Write ``model`` (a result of :func:`fxcompress.optimize` or :func:`fxcompress.capture`) to ``path``.

    The graph is re-exported with ``torch.export``, every dim that is symbolic in it marked
    ``Dim.AUTO`` (so the archive keeps the dynamic dims), and saved with ``torch.export.save``; the
    pipeline, report and input-shape summary go in as JSON. A model fxcompress did not capture is
    captured first (on ``example_inputs``, dynamic by default).
    """
    if not (isinstance(model, fx.GraphModule) and "fxcompress_shapes" in model.meta):
        if example_inputs is None:
            raise InvalidInputError(
                "save() needs example inputs for a model that fxcompress did not capture; pass example_inputs="
            )
        model = capture(model, example_inputs)
    inputs = ExampleInputs.of(example_inputs) if example_inputs is not None else model.meta["fxcompress_export_inputs"]
    program = _export_keeping_dynamic_dims(model, inputs)
    shapes = _merged_shapes(model.meta["fxcompress_shapes"], program, model.meta["fxcompress_example_inputs"])
    metadata = {
        "pipeline": getattr(model, "pipeline", []),
        "report": model.report.to_dict() if hasattr(model, "report") and hasattr(model.report, "to_dict") else None,
        "shapes": shapes.to_dict(),
    }
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata, default=str)})


def _export_keeping_dynamic_dims(model: fx.GraphModule, inputs: ExampleInputs) -> torch.export.ExportedProgram:
    symbolic = {
        name: [d for d, size in enumerate(node.meta["val"].shape) if isinstance(size, torch.SymInt)]
        for node, name in zip(placeholders(model), input_names(model)) if isinstance(node.meta.get("val"), torch.Tensor)
    }
    dynamic_shapes = auto_dynamic_shapes(model, inputs.args, inputs.kwargs, dims_of=lambda name, t: symbolic.get(name, []))
    with torch.no_grad():
        return torch.export.export(model, inputs.args, inputs.kwargs, strict=False, dynamic_shapes=dynamic_shapes)


def _merged_shapes(captured: ShapeSummary, program: torch.export.ExportedProgram, inputs: ExampleInputs) -> ShapeSummary:
    """The saved graph's dynamic dims, with the capture's reasons for the dims that are static."""
    saved = summarize(program.module(), inputs.args, inputs.kwargs)
    for new, old in zip(saved.inputs, captured.inputs):
        if new is not None and old is not None and len(new.dims) == len(old.dims):
            new.dims = [o if not n.dynamic and not o.dynamic else n for n, o in zip(new.dims, old.dims)]
    saved.widened, saved.second_shape = captured.widened, captured.second_shape
    return saved


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by :func:`save`; ``.pipeline`` and ``.saved_report`` come back as plain data."""
    import fxcompress.passes  # noqa: F401  (registers custom ops the graph may call)

    extra = {METADATA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    model = program.module()
    metadata = json.loads(extra[METADATA_FILE] or "{}")
    model.pipeline = metadata.get("pipeline", [])
    model.saved_report = metadata.get("report")
    if metadata.get("shapes"):
        install_guard_errors(model, ShapeSummary.from_dict(metadata["shapes"]))
    return model
