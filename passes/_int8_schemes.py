"""The int8 pass's configurations: one frozen config per scheme over shared options, and their handlers' registry.

As in torchao's ``quant_api``, a config is plain data (validated in ``__post_init__``, prints, compares,
saves) and what a scheme does is the handler registered for the config's type
(:func:`register_scheme`; the built-in handlers are in ``passes/int8.py``). ``Int8(mode=...)`` is a
thin alias that builds the mode's config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from fxcompress.errors import PassConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class Int8(Pass):
    """Int8 linear layers and 1×1 convs: the options every scheme shares, and the alias ``Int8(mode=...)``.

    One frozen config per scheme (torchao ``quant_api`` style): :class:`Int8Dynamic` (W8A8, per-token
    activations), :class:`Int8Static` (W8A8, calibrated per-tensor activation scales, every conv) and
    :class:`Int8WeightOnly` (W8A16); the scheme's behaviour is the handler registered for its type
    (:func:`register_scheme`). ``Int8(mode="static", activation_scales=s)`` is a thin alias for
    ``Int8Static(activation_scales=s)`` (``mode`` defaults to ``"dynamic"``; an option of another
    scheme left at its default is dropped, a non-default one is an error naming its scheme).

    Shared options. ``skip``: module selectors (:mod:`fxcompress.selectors`; ``"pooler"`` also covers
    ``pooler.dense``) kept in float. ``min_weight_numel``: smaller weights stay float (per-token
    quantization and dequantization cost more than the int8 GEMM saves). ``fuse_siblings``: linears
    that read the same input run as one GEMM. ``tune``: time every candidate implementation of each
    node at its real shapes on this machine (cached per machine) and use the fastest; ``tune=False``
    uses the static table per CPU feature (``_int8_lowering``). ``allow_slower``: the purpose is size —
    rewrite even where float measures faster (the fastest int8 candidate is used; the report says if
    the model got slower). ``impl``: force one candidate (``"int_mm"``, ``"qengine:fbgemm"``,
    ``"triton"``, ``"int8_weight_only"``, ...). ``error_factor``: the fidelity contract — a candidate's
    output error may be at most this multiple of the scheme's own (per-tensor engines vs per-token).
    ``decode_rows``: when the example has more rows (tokens × batch) than this, each linear's engine is
    chosen twice, at one row (decoding) and at the example's rows (prefill), and a layer whose choices
    differ runs both by its input's row count (``fxcompress::int8_linear_by_rows``: this many rows or
    fewer take the decode engine); ``None``: one engine, chosen at the example's rows.
    ``tune_time_s``: timing per candidate. ``gptq``: round weights with GPTQ on the calibration
    inputs' Hessian ``XᵀX`` (``passes/_gptq.py``) instead of to nearest; layers without a Hessian (too
    many input features) round to nearest. ``embeddings``: also store embedding tables as weight-only
    int8 (``fxcompress::int8_embedding``, per-row scales; a tied LM head and its table share one int8
    table, ``passes/_int8_embeddings.py``) — for size: a lookup is not faster.
    """

    name = "int8"
    lossless = False
    mode: ClassVar[str] = ""

    skip: tuple[str, ...] = ()
    min_weight_numel: int = 65536
    fuse_siblings: bool = True
    allow_slower: bool = False
    tune: bool = True
    impl: str | None = None
    decode_rows: int | None = 16
    error_factor: float = 3.0
    tune_time_s: float = 0.05
    gptq: bool = False
    embeddings: bool = False

    @classmethod
    def config_class(cls, args: tuple, kwargs: dict) -> tuple[type, tuple, dict]:
        """``Int8(mode=..., **options)`` builds that mode's scheme config; a scheme class builds itself."""
        if cls is not Int8:
            return cls, args, kwargs
        if len(args) > 1:
            raise PassConfigError("int8: Int8(...) takes only mode positionally; pass the other options by name")
        mode = args[0] if args else kwargs.pop("mode", "dynamic")
        if mode not in SCHEME_CONFIGS:
            raise PassConfigError(f"int8: mode must be one of {MODES}, not {mode!r}")
        scheme = SCHEME_CONFIGS[mode]
        own = {f.name for f in dataclasses.fields(scheme)}
        for key, value in list(kwargs.items()):
            owners = [c for c in SCHEME_CONFIGS.values() if key in c.__dataclass_fields__]
            if key in own or not owners:
                continue  # the scheme's own option, or an unknown one (named by the scheme's check)
            if all(value == c.__dataclass_fields__[key].default for c in owners):
                del kwargs[key]
            else:
                modes = " or ".join(repr(c.mode) for c in owners)
                raise PassConfigError(f"int8: {key} needs mode={modes} ({owners[0].__name__}); {scheme.__name__} has no such option")
        return scheme, (), kwargs

    def config(self) -> dict:
        return {"pass": self.name, "mode": self.mode, **dataclasses.asdict(self)}

    @classmethod
    def options_help(cls) -> str:
        if cls is not Int8:
            return super().options_help()
        shared = {f.name for f in dataclasses.fields(Int8)}
        lines = [f"  mode: str = 'dynamic'  (one of {MODES}: {', '.join(c.__name__ for c in SCHEME_CONFIGS.values())})",
                 super().options_help()]
        for config in SCHEME_CONFIGS.values():
            own = [line for line in config.options_help().splitlines() if line.split(":")[0].strip() not in shared]
            lines += [f"  only mode={config.mode!r}:", *(f"  {line}" for line in own)] if own else []
        return "\n".join(lines)

    def __post_init__(self) -> None:
        if type(self) is Int8 or type(self) not in _SCHEMES:
            raise PassConfigError(f"int8: {type(self).__name__} has no scheme handler; register one with register_scheme")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise PassConfigError(f"int8: skip must be a list of module names or globs, e.g. skip=['pooler'], not {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not (isinstance(self.error_factor, int | float) and self.error_factor >= 1.0):
            raise PassConfigError(f"int8: error_factor must be a number >= 1 (1 = exactly the mode's scheme), not {self.error_factor!r}")
        if not (isinstance(self.tune_time_s, int | float) and self.tune_time_s > 0):
            raise PassConfigError(f"int8: tune_time_s must be > 0 seconds, not {self.tune_time_s!r}")
        if self.decode_rows is not None and not (isinstance(self.decode_rows, int) and self.decode_rows >= 1):
            raise PassConfigError(f"int8: decode_rows must be an integer >= 1 or None (one engine per layer), not {self.decode_rows!r}")
        if not isinstance(self.min_weight_numel, int) or self.min_weight_numel < 0:
            raise PassConfigError(f"int8: min_weight_numel must be an integer >= 0, not {self.min_weight_numel!r}")

    @property
    def scheme(self) -> Scheme:
        return _SCHEMES[type(self)]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.scheme.run(self, gm, ctx)


@dataclass(frozen=True)
class Int8Dynamic(Int8):
    """W8A8, activations quantized per token at run time: ``linear(x, W, b) -> int8_linear(x, W_q, s_w, b)``;
    the GEMM accumulates in int32 and dequantizes by ``s_x[m]·s_w[n]``.

    ``fuse_activation``: fold a following relu/gelu into the epilogue. ``smooth_alpha``: SmoothQuant —
    migrate activation outliers into the weights with per-input-channel
    ``σ_j = max|X_j|^α / max|W_j|^(1−α)`` measured on the calibration data (the example inputs if none):
    ``x Wᵀ = (x / σ)(W · σ)ᵀ``, so ``x / σ`` quantizes per token with less error. ``fold_smoothing``:
    store ``1/σ`` in the LayerNorm/RMSNorm producing ``x`` when only the smoothed layers read it
    (``passes/_smoothquant.py``), else an explicit multiply.
    """

    mode = "dynamic"
    fuse_activation: bool = True
    smooth_alpha: float | None = None
    fold_smoothing: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_smoothing(self)


@dataclass(frozen=True)
class Int8Static(Int8):
    """W8A8 with calibrated per-tensor activation scales: ``linear(x, W, b) -> int8_linear_static(x, s_x, W_q, s_w, b)``.

    ``activation_scales``: ``(layer, s_x)`` pairs from :func:`fxcompress.calibrate` (required; plain
    data, so the config prints and saves). Every conv1d/conv2d (any kernel, stride, dilation, groups)
    lowers to ``fxcompress::int8_conv`` chains (BN folded first: run ``fold_bn`` before; relu/ReLU6 and
    residual add fused) that pass int8 values between them, and keeps float every region (and the whole
    model) that does not measure faster than float; ``conv_regions=False`` quantizes and dequantizes
    around every conv instead (``passes/_int8_conv.py``, ``_int8_conv_regions.py``). ``fuse_activation``: fold a
    following relu/gelu into a linear's epilogue. ``smooth_alpha`` / ``fold_smoothing``: SmoothQuant on the
    linears as in :class:`Int8Dynamic`; each calibrated scale of ``x`` is rescaled to the range of ``x/σ``
    (from the calibration data's per-channel ``max|x|``).
    """

    mode = "static"
    activation_scales: tuple[tuple[str, float], ...] = ()
    fuse_activation: bool = True
    conv_regions: bool = True
    smooth_alpha: float | None = None
    fold_smoothing: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_smoothing(self)
        object.__setattr__(self, "activation_scales", self._checked_scales())
        if not self.activation_scales:
            raise PassConfigError(
                "int8: mode='static' needs activation_scales; compute them with "
                "`scales = fxcompress.calibrate(model, batches)` and pass Int8(mode='static', activation_scales=scales)"
            )

    def _checked_scales(self) -> tuple[tuple[str, float], ...]:
        pairs = tuple(self.activation_scales.items()) if isinstance(self.activation_scales, dict) else self.activation_scales
        try:
            checked = tuple((str(name), float(scale)) for name, scale in pairs)
        except (TypeError, ValueError) as exc:
            raise PassConfigError(f"int8: activation_scales must be (layer, scale) pairs from fxcompress.calibrate: {exc}") from exc
        bad = [(n, s) for n, s in checked if not (math.isfinite(s) and s > 0)]
        if bad:
            raise PassConfigError(f"int8: activation scales must be finite and > 0; got {bad[:3]} (calibrate on non-degenerate batches)")
        return checked


def _check_smoothing(config: Int8) -> None:
    if config.smooth_alpha is not None and not (0.0 <= config.smooth_alpha <= 1.0):
        raise PassConfigError(f"int8: smooth_alpha must be in [0, 1] (typically 0.5), not {config.smooth_alpha!r}")


@dataclass(frozen=True)
class Int8WeightOnly(Int8):
    """W8A16: ``linear(x, W, b) -> int8_weight_only_linear(x, W_q, s_w, b)``; activations stay float."""

    mode = "weight_only"


SCHEME_CONFIGS: dict[str, type[Int8]] = {c.mode: c for c in (Int8Dynamic, Int8WeightOnly, Int8Static)}
MODES = tuple(SCHEME_CONFIGS)


class Scheme:
    """How one int8 scheme rewrites a graph, registered for its config type with :func:`register_scheme`."""

    def run(self, config: Int8, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError


_SCHEMES: dict[type[Int8], Scheme] = {}


def register_scheme(config_type: type[Int8]):
    """Class decorator: the handler class for ``config_type`` (a frozen :class:`Int8` subclass)."""
    def register(handler: type[Scheme]) -> type[Scheme]:
        _SCHEMES[config_type] = handler()
        return handler

    return register
