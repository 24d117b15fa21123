"""The custom operators rewritten nodes lower to (``torch.ops.fxcompress.*``); importing this package registers all of them.

* :mod:`.int8_linear` — ``int8_linear``, ``int8_linear_static``, ``int8_weight_only_linear``,
  ``quantize_per_token`` (Triton on CUDA, ATen on the CPU), ``int8_linear_qengine`` and ``int8_embedding``;
* :mod:`.int8_conv` — ``quantize_u8``, ``dequantize_u8``, ``int8_conv``, ``int8_max_pool2d`` (quantized
  engines on the CPU; the Triton conv and ATen bodies on CUDA);
* :mod:`.int8_experts` — ``int8_grouped_linear``, the per-expert int8 GEMM of mixture-of-experts layers;
* :mod:`.qengine` — what the ops on PyTorch's quantized engines share (the prepack cache).

This layer imports the kernels (``fxcompress.triton_kernels``, on the first CUDA call) and nothing of
the passes. ``import fxcompress`` does not load it; the passes and :func:`fxcompress.load` do. The
operator names are part of every saved archive: they stay as they are.
"""

from . import int8_conv, int8_experts, int8_linear, qengine

__all__ = ["int8_conv", "int8_experts", "int8_linear", "qengine"]
