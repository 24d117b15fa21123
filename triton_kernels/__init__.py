"""Triton GPU kernels that rewritten nodes lower to (imported as ``fxcompress.triton_kernels``).

The constants below are shared with the CPU bodies of the same ops (``fxcompress/ops/``); this
file imports nothing, so reading them does not import Triton (optional off Linux x86-64).
"""

EPS = 1e-8
"""Smallest per-row absmax a dynamic quantization divides by (an all-zero row gets scale ``EPS / 127``)."""

ACTIVATIONS = ("none", "relu", "gelu")
"""Activations the GEMM epilogues can fuse, by code (index); ``gelu`` is the exact (erf) form of ``aten.gelu``."""
