"""SmoothQuant for the ``int8`` pass: the factors, the static scale of the smoothed input, and folding
``1/σ`` into the LayerNorm / RMSNorm that produces a GEMM's input.

``σ_j = max|x_j|^α / max|W_j|^(1−α)`` per input channel (``max|W_j|`` over every weight of a sibling
group); a calibrated per-tensor range ``r`` of ``x`` becomes ``r · max_j(a_j/σ_j) / max_j a_j`` for
``x/σ`` (``a_j = max|x_j|`` on the calibration data; exact for min-max calibration).

SmoothQuant computes ``x Wᵀ = (x/σ)(W·σ)ᵀ``. When ``x`` is a normalisation's affine output,
``x = n(h)·γ + β`` (LayerNorm) or ``x = n(h)·γ`` (RMSNorm: ``aten.rms_norm`` or Hugging Face's
``γ * hidden`` multiply), then ``x/σ = n(h)·(γ/σ) + β/σ``: the scale is stored in the norm's
parameters and the explicit multiply disappears. This is exact only if nothing else reads ``x``
(in a post-LN transformer such as BERT the residual add reads it too) and the parameters are not
shared; otherwise the multiply stays and the reason is reported.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxcompress import ir
from fxcompress.statistics import layer_statistics

aten = torch.ops.aten


def activation_absmax(gm: fx.GraphModule, ctx, linears: list[fx.Node]) -> dict[str, torch.Tensor]:
    """Per input channel ``max|x_j|`` of each linear on the calibration data (the statistics analysis)."""
    return {name: s.channel_absmax.float() for name, s in layer_statistics(gm, ctx, linears, gram=False).items()}


def smooth(alpha: float, weights: list[torch.Tensor], absmax: torch.Tensor, input_scale: float | None):
    """``(σ, [W·σ], the static scale of x/σ)`` from ``absmax = max|x_j|`` and the static scale of ``x``."""
    sigma = smoothing_factors(alpha, weights, absmax)
    scale = smoothed_input_scale(input_scale, absmax, sigma) if input_scale is not None else None
    return sigma, [w * sigma.to(w.dtype) for w in weights], scale


def smoothing_factors(alpha: float, weights: list[torch.Tensor], activation_absmax: torch.Tensor) -> torch.Tensor:
    weight_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    sigma = activation_absmax.pow(alpha) / weight_absmax.pow(1 - alpha)
    return torch.where((activation_absmax > 0) & (weight_absmax > 0), sigma, torch.ones_like(sigma)).clamp(1e-5, 1e5)


def smoothed_input_scale(scale: float, activation_absmax: torch.Tensor, sigma: torch.Tensor) -> float:
    """The per-tensor scale of ``x/σ`` from that of ``x``."""
    top = activation_absmax.max()
    return scale * float((activation_absmax / sigma).max() / top) if top > 0 else scale


def fold_into_norm(gm: fx.GraphModule, x: fx.Node, readers: list[fx.Node], inverse: torch.Tensor) -> str:
    """Scale the norm producing ``x`` by ``inverse`` (= 1/σ) and return ``""``; or, changing nothing, why not."""
    if set(x.users) - set(readers):
        others = ", ".join(sorted(u.name for u in x.users if u not in readers))
        return f"explicit multiply: {x.name} is also read by {others}"
    params, problem = _norm_parameters(gm, x, inverse.numel())
    if problem:
        return f"explicit multiply: {problem}"
    for node in params:
        if ir.attr_use_count(gm, node.target) != 1:
            return f"explicit multiply: the norm's parameter {node.target} is shared"
    for node in params:
        value = ir.get_attr(gm, node.target).detach()
        ir.set_attr(gm, node.target, (value * inverse.to(value.dtype)).contiguous())
    return f"folded into {ir.module_path(x) or x.name}"


def _norm_parameters(gm: fx.GraphModule, x: fx.Node, features: int) -> tuple[list[fx.Node], str]:
    """The get_attr nodes of ``x``'s affine parameters (γ, and β if any) over its last dim."""
    if x.op != "call_function":
        return [], f"{x.name} is not a LayerNorm/RMSNorm output"
    args = ir.call_arguments(x) if x.target in (aten.layer_norm.default, aten.rms_norm.default) else {}
    if args:
        if len(args["normalized_shape"]) != 1:
            return [], f"{x.name} normalises over more than the last dim"
        params = [args["weight"]] + ([args["bias"]] if x.target is aten.layer_norm.default else [])
        params = [p for p in params if p is not None]
        if args["weight"] is None:
            return [], f"{x.name} has no affine weight to fold into"
    elif x.target is aten.mul.Tensor:  # Hugging Face RMSNorm: weight * normalized
        params = [a for a in x.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        if len(params) != 1:
            return [], f"{x.name} is not a multiply by a norm weight"
    else:
        return [], f"{x.name} ({x.target}) is not a LayerNorm/RMSNorm output"
    for p in params:
        if not isinstance(p, fx.Node) or p.op != "get_attr":
            return [], f"{x.name}'s affine parameters are computed"
        if tuple(ir.get_attr(gm, p.target).shape) != (features,):
            return [], f"{p.target} is not a per-feature vector of {features}"
    return params, ""
