"""Save/load compressed models as torch.export ``.pt2`` archives (no pickle of Python objects)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.fx as fx

from .capture import ExampleInputs
from .errors import InvalidInputError

METADATA_FILE = "fxcompress.json"


def save(model: fx.GraphModule, path: str | os.PathLike, example_inputs: Any = None) -> None:
    """Write ``model`` (a result of :func:`fxcompress.optimize` or :func:`fxcompress.capture`) to ``path``.

    The graph is re-exported with ``torch.export`` (batch dimension kept dynamic when the capture
    had it) and saved with ``torch.export.save``; the pipeline and report go in as JSON.
    """
    inputs = ExampleInputs.of(example_inputs) if example_inputs is not None else model.meta.get("fxcompress_example_inputs") if isinstance(model, fx.GraphModule) else None
    if inputs is None:
        raise InvalidInputError(
            "save() needs example inputs for a model that fxcompress did not capture; pass example_inputs="
        )
    dynamic = model.meta.get("fxcompress_dynamic_batch", False) if isinstance(model, fx.GraphModule) else False
    dynamic_shapes = inputs.batch_dynamic_shapes(model) if dynamic else None
    with torch.no_grad():
        program = torch.export.export(model, inputs.args, inputs.kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    metadata = {
        "pipeline": getattr(model, "pipeline", []),
        "report": model.report.to_dict() if hasattr(model, "report") and hasattr(model.report, "to_dict") else None,
    }
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata, default=str)})


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by :func:`save`; ``.pipeline`` and ``.saved_report`` come back as plain data."""
    import fxcompress.passes  # noqa: F401  (registers custom ops the graph may call)

    extra = {METADATA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    model = program.module()
    metadata = json.loads(extra[METADATA_FILE] or "{}")
    model.pipeline = metadata.get("pipeline", [])
    model.saved_report = metadata.get("report")
    return model
