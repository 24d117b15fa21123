"""Save/load compressed models as torch.export ``.pt2`` archives (no pickle of Python objects)."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import torch
import torch.fx as fx

from .capture import ExampleInputs, inference_only
from .errors import ArchiveError, InvalidInputError
from .quiet import quiet, third_party_quiet

METADATA_FILE = "fxcompress.json"


@quiet
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


@quiet
def load(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by :func:`save`, with ``.pipeline`` (plain dicts) and ``.report`` (a :class:`Report`).

    Like the result of :func:`fxcompress.optimize` it is inference-only: ``eval()`` is a no-op,
    ``train()`` raises :class:`fxcompress.errors.InferenceOnlyError`. A file that is not a ``.pt2``
    archive (empty, truncated, a ``torch.save`` checkpoint) raises :class:`ArchiveError`.
    """
    import fxcompress.passes  # noqa: F401  (registers custom ops the graph may call)
    from .report import Report

    _check_archive(os.fspath(path))
    extra = {METADATA_FILE: ""}
    try:
        with third_party_quiet():  # torch.export.load logs a traceback before re-raising
            program = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise ArchiveError(f"{os.fspath(path)!r} is not a readable fxcompress/.pt2 archive ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); write it with fxcompress.save") from exc
    model = inference_only(program.module())
    metadata = json.loads(extra[METADATA_FILE] or "{}")
    model.pipeline = metadata.get("pipeline", [])
    model.report = Report.from_dict(metadata["report"]) if metadata.get("report") else None
    return model


def _check_archive(path: str) -> None:
    """Name what the file is when it is not a ``.pt2`` zip archive, before torch.export tries it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file {path!r}; pass the path fxcompress.save wrote")
    size = os.path.getsize(path)
    if size == 0:
        raise ArchiveError(f"{path!r} is empty (0 bytes), not an fxcompress/.pt2 archive; save one with fxcompress.save")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            raise ArchiveError(f"{path!r} is truncated or corrupted ({size} bytes, no zip directory); save it again")
        raise ArchiveError(f"{path!r} is not an fxcompress/.pt2 archive (not a zip file); save one with fxcompress.save")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.endswith("data.pkl") for n in names) and not any(n.endswith("archive_format") for n in names):
        raise ArchiveError(
            f"{path!r} is a torch.save checkpoint (pickle), not an fxcompress/.pt2 archive: read it with torch.load, "
            f"or optimize the model and write it with fxcompress.save"
        )



