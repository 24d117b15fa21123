"""fxcompress: compiler-style model compression for PyTorch.

``fxcompress.optimize(model, example_inputs)`` captures the model as an ATen-level torch.fx graph,
runs verified rewrite passes on it and returns a smaller/faster ``GraphModule`` with a per-pass report.
"""

from . import int8_ops, int8_conv_ops  # noqa: F401  (registers the fxcompress:: custom ops)
from .api import DEFAULT_PASSES, optimize
from .calibrate import calibrate
from .capture import capture
from .distill import distill
from .dynamo_backend import backend
from .errors import (
    CaptureError,
    FxCompressError,
    InvalidInputError,
    PassConfigError,
    UnknownPassError,
    VerificationError,
)
from .instrument import Instrumentation, IRDumper, PassTimer
from .manager import PassManager
from .pass_base import Pass, PassContext, PassResult, make_pass, register_pass, registered_passes
from .report import Report, ReportConfig
from .serialize import load, save
from . import passes  # noqa: E402,F401  (registers the built-in passes; fxcompress.passes.FoldBN() etc.)

__all__ = [
    "DEFAULT_PASSES", "CaptureError", "FxCompressError", "InvalidInputError", "IRDumper", "Instrumentation",
    "Pass", "PassConfigError", "PassContext", "PassManager", "PassResult", "PassTimer", "Report",
    "ReportConfig", "UnknownPassError", "VerificationError", "backend", "calibrate", "capture", "distill", "load", "make_pass", "optimize",
    "register_pass", "registered_passes", "save",
]
