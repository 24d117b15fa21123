"""What the ops that run on PyTorch's quantized engines (FBGEMM/x86/oneDNN/QNNPACK, CPU) share.

``torch.export`` cannot save an engine's packed-parameter object, so a graph stores the int8 weight
and its scales as tensors and the op packs them on first use: :data:`prepacked` keeps the packed
weight per weight tensor (see :class:`PrepackCache`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

QUANTIZED_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")
"""PyTorch quantized engines with a prepacked dynamic linear; which exist depends on the build."""


@functools.lru_cache(maxsize=None)
def _supported_engines() -> frozenset[str]:
    return frozenset(torch.backends.quantized.supported_engines)  # fixed by the build


def engine_available(engine: str) -> bool:
    return engine in _supported_engines()


@contextlib.contextmanager
def engine_scope(engine: str):
    """``torch.backends.quantized.engine = engine`` inside the block (the engine ops and prepacks read it)."""
    previous = torch.backends.quantized.engine
    if previous == engine:  # the ops run once per layer: skip the two global writes when nothing changes
        yield
        return
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@functools.lru_cache(maxsize=None)
def silence_quantized_deprecation() -> None:
    """Make ATen's one-time "quantized tensors are deprecated" warning here, silenced.

    Quantized tensors are the engines' input format; ATen warns about creating them once per process
    (``TORCH_WARN_ONCE``), so the ops call this once instead of wrapping every call in ``catch_warnings``
    (which costs more than a small conv)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._empty_affine_quantized([0], scale=1.0, zero_point=0, dtype=torch.quint8)


def check_engine(x: Tensor, engine: str, op: str) -> None:
    """The error of an engine op called off the CPU or with an engine this build lacks."""
    if x.device.type != "cpu" or not engine_available(engine):
        raise RuntimeError(
            f"fxcompress::{op} runs on the CPU with a quantized engine this PyTorch build has "
            f"({torch.backends.quantized.supported_engines}); got {x.device} and {engine!r}: re-run the int8 pass here"
        )


def reduce_range(engine: str) -> bool:
    # FBGEMM's u8·s8 AVX2 kernels (VPMADDUBSW) can saturate int16 pairs: 7-bit activations avoid it.
    return engine in ("x86", "fbgemm")


class PrepackCache:
    """Prepacked weights of the quantized engines, built on first use and kept per ``weight_q`` tensor.

    An entry dies with its weight tensor (a finalizer on it) and is rebuilt when the weight, scales or
    bias change (version counters, data pointers).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._packs: dict[int, dict] = {}

    def get(self, weight_q: Tensor, weight_scale: Tensor, bias: Optional[Tensor], engine: str, pack: Callable,
            config: tuple = (), part: int | None = None):
        """``pack(weight_q, weight_scale, bias, engine, *config)`` on a miss; ``part`` keeps one pack per slice of
        ``weight_q`` (an expert of a ``[experts, N, K]`` weight: ``pack`` slices it)."""
        stamp = (engine, part, weight_q._version, weight_q.data_ptr(), weight_scale._version, weight_scale.data_ptr(),
                 None if bias is None else (bias._version, bias.data_ptr()), config)
        with self._lock:
            entry = self._packs.get(id(weight_q))
            if entry is None:
                entry = self._packs[id(weight_q)] = {}
                weakref.finalize(weight_q, self._packs.pop, id(weight_q), None)
            packed = entry.get(stamp)
            if packed is None:
                packed = pack(weight_q, weight_scale, bias, engine, *config)
                for stale in [k for k in entry if k[:2] == (engine, part)]:
                    del entry[stale]
                entry[stamp] = packed
        return packed

    def discard(self, weight_q: Tensor) -> None:
        """Drop every pack of ``weight_q`` (those built while timing engines the graph may not use); the
        next call packs again for its own engine only."""
        with self._lock:
            self._packs.get(id(weight_q), {}).clear()

    def __len__(self) -> int:
        return sum(len(entry) for entry in self._packs.values())


prepacked = PrepackCache()


def per_channel_qweight(weight_q: Tensor, weight_scale: Tensor) -> Tensor:
    """The ``qint8`` per-output-channel tensor an engine prepack takes (``W ≈ s_w ⊙ W_q``, zero point 0)."""
    return torch._make_per_channel_quantized_tensor(
        weight_q.detach(), weight_scale.detach().double(), torch.zeros(weight_q.shape[0], dtype=torch.long), 0)
