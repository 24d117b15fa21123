"""fxcompress: compiler-style model compression for PyTorch.

``fxcompress.optimize(model, example_inputs)`` captures the model as an ATen-level torch.fx graph,
runs verified rewrite passes on it and returns a smaller/faster ``GraphModule`` with a per-pass report.

Heavy parts load on first use (``import fxcompress`` stays cheap): the passes (``fxcompress.passes``),
the custom operators they lower to (``fxcompress.ops``) and the ``torch.compile`` backend (``backend``).
"""

import importlib

from .api import DEFAULT_PASSES, optimize
from .apply import apply_to_model, load_pretrained
from .calibrate import calibrate
from .capture import capture
from .distill import distill
from .distill_config import DistillConfig
from .generation import GenerationFidelity, generation_fidelity
from .errors import (
    ArchiveError,
    CaptureError,
    FxCompressError,
    FxCompressWarning,
    InferenceOnlyError,
    InputShapeError,
    InvalidInputError,
    PassConfigError,
    UnknownPassError,
    VerificationError,
)
from .instrument import Instrumentation, IRDumper, PassTimer
from .manager import PassManager
from .pass_base import Pass, PassContext, PassResult, register_pass
from .registry import make_pass, registered_passes
from .report import Report, ReportConfig
from .search import Target
from .serialize import load, save

_LAZY = {"backend": ("dynamo_backend", "backend")}
_LAZY_MODULES = ("passes", "ops", "dynamo_backend", "models", "cli")


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'fxcompress' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_PASSES", "ArchiveError", "CaptureError", "DistillConfig", "FxCompressError", "FxCompressWarning", "InferenceOnlyError",
    "InputShapeError", "InvalidInputError", "IRDumper", "Instrumentation", "Pass", "PassConfigError", "PassContext",
    "PassManager", "PassResult", "PassTimer", "Report", "ReportConfig", "Target", "UnknownPassError", "VerificationError",
    "GenerationFidelity", "apply_to_model", "backend", "calibrate", "capture", "distill", "generation_fidelity", "load",
    "load_pretrained", "make_pass", "optimize", "register_pass", "registered_passes",
    "save",
]
