"""The int8 expert GEMM of mixture-of-experts layers: ``fxcompress::int8_grouped_linear``.

``x [S, K]`` holds the routed tokens sorted by expert and ``offsets [E]`` (int32) the cumulative row counts —
the ``offs`` of ``torch._grouped_mm``: expert ``e`` owns rows ``offsets[e-1]:offsets[e]``. ``weight_q [E, N, K]``
is int8 with ``weight_scale [E, N]`` (``W_e ≈ s_w[e] ⊙ W_q[e]``: per expert, per output channel). Each expert
that has rows runs one int8 linear on its slice — only the experts the tokens reach are read — with the engine
chosen for its row count: ``small`` up to ``max_small_rows`` rows (decoding: a token sends one row to each of
its top-k experts), ``large`` above. Engines are named as the int8 pass's candidates: ``int8_weight_only`` or
``dequantize`` (weight-only: ``s_w ⊙ W_q[e]`` then one float GEMM), ``int_mm`` (per-token W8A8), ``qengine:<engine>``
(a quantized engine's prepacked dynamic linear, one pack per expert, cached). Rows past ``offsets[-1]`` are 0.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op
from torch.utils.flop_counter import register_flop_formula

from .int8_linear import _prepack, int8_linear, int8_weight_only_linear
from .qengine import check_engine, prepacked, reduce_range

EXPERT_ENGINES = ("dequantize", "int8_weight_only", "int_mm", "qengine:<engine>")


def quantize_experts(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``W [E, N, K] -> (W_q int8 [E, N, K], s_w fp32 [E, N])``, symmetric per expert and output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def _expert_linear(engine: str, rows: Tensor, weight_q: Tensor, weight_scale: Tensor, expert: int) -> Tensor:
    if engine in ("dequantize", "int8_weight_only"):
        return int8_weight_only_linear(rows, weight_q[expert], weight_scale[expert], None)
    if engine in ("int_mm", "triton"):
        return int8_linear(rows, weight_q[expert], weight_scale[expert], None, "none")
    if engine.startswith("qengine:"):
        name = engine.removeprefix("qengine:")
        check_engine(rows, name, "int8_grouped_linear")
        packed = prepacked.get(weight_q, weight_scale, None, name,
                               lambda w, s, b, e: _prepack(w[expert], s[expert], b, e), part=expert)
        return torch.ops.quantized.linear_dynamic(rows.float().contiguous(), packed, reduce_range(name)).to(rows.dtype)
    raise ValueError(f"fxcompress::int8_grouped_linear: unknown engine {engine!r}; one of {EXPERT_ENGINES}")


@custom_op("fxcompress::int8_grouped_linear", mutates_args=())
def int8_grouped_linear(x: Tensor, weight_q: Tensor, weight_scale: Tensor, offsets: Tensor, small: str, large: str,
                        max_small_rows: int) -> Tensor:
    """``y[rows of e] = x[rows of e] · W_eᵀ`` for every expert ``e`` with rows (see the module docstring)."""
    out = x.new_zeros((x.shape[0], weight_q.shape[1]))
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            engine = small if end - start <= max_small_rows else large
            out[start:end] = _expert_linear(engine, x[start:end], weight_q, weight_scale, expert)
        start = max(start, end)
    return out


@int8_grouped_linear.register_fake
def _grouped_fake(x: Tensor, weight_q: Tensor, *args) -> Tensor:
    return x.new_empty((x.shape[0], weight_q.shape[1]))


@register_flop_formula(torch.ops.fxcompress.int8_grouped_linear)
def _grouped_flop(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * weight_shape[1] * weight_shape[2]  # every routed row through one expert's [N, K]
