"""Triton GPU kernels that rewritten nodes lower to (imported as ``fxcompress.triton_kernels``)."""
