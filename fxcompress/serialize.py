"""Save/load compressed models as torch.export ``.pt2`` archives (no pickle of Python objects)."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import torch
import torch.fx as fx

from .capture import capture, inference_only
from .errors import ArchiveError, InvalidInputError
from .inputs import Inputs
from .quiet import quiet, third_party_quiet
from .report import Report
from .shapes import ShapeSummary, auto_dynamic_shapes, input_names, install_guard_errors, placeholders, summarize

METADATA_FILE = "fxcompress.json"


@quiet
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
    inputs = Inputs.of(example_inputs) if example_inputs is not None else model.meta["fxcompress_export_inputs"]
    program = _export_keeping_dynamic_dims(model, inputs)
    shapes = _merged_shapes(model.meta["fxcompress_shapes"], program, model.meta["fxcompress_example_inputs"])
    metadata = {
        "pipeline": getattr(model, "pipeline", []),
        "report": model.report.to_dict() if hasattr(model, "report") and hasattr(model.report, "to_dict") else None,
        "shapes": shapes.to_dict(),
    }
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata, default=str)})


def _export_keeping_dynamic_dims(model: fx.GraphModule, inputs: Inputs) -> torch.export.ExportedProgram:
    symbolic = {
        name: [d for d, size in enumerate(node.meta["val"].shape) if isinstance(size, torch.SymInt)]
        for node, name in zip(placeholders(model), input_names(model)) if isinstance(node.meta.get("val"), torch.Tensor)
    }
    dynamic_shapes = auto_dynamic_shapes(model, inputs.args, inputs.kwargs, dims_of=lambda name, t: symbolic.get(name, []))
    with torch.no_grad():
        return torch.export.export(model, inputs.args, inputs.kwargs, strict=False, dynamic_shapes=dynamic_shapes)


def _merged_shapes(captured: ShapeSummary, program: torch.export.ExportedProgram, inputs: Inputs) -> ShapeSummary:
    """The saved graph's dynamic dims, with the capture's reasons for the dims that are static."""
    saved = summarize(program.module(), inputs.args, inputs.kwargs)
    for new, old in zip(saved.inputs, captured.inputs):
        if new is not None and old is not None and len(new.dims) == len(old.dims):
            new.dims = [o if not n.dynamic and not o.dynamic else n for n, o in zip(new.dims, old.dims)]
    saved.widened, saved.second_shape = captured.widened, captured.second_shape
    return saved


@quiet
def load(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by :func:`save`, with ``.pipeline`` (plain dicts) and ``.report`` (a :class:`Report`).

    Like the result of :func:`fxcompress.optimize` it is inference-only: ``eval()`` is a no-op,
    ``train()`` raises :class:`fxcompress.errors.InferenceOnlyError`. A file that is not a ``.pt2``
    archive (empty, truncated, a ``torch.save`` checkpoint) raises :class:`ArchiveError`.
    """
    from . import ops  # noqa: F401  (registers the custom ops the graph may call; here, so import fxcompress stays fast)

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
    if metadata.get("shapes"):
        install_guard_errors(model, ShapeSummary.from_dict(metadata["shapes"]))
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



