"""Low-rank decomposition of Linear and Conv layers (pass ``low_rank``).

For a layer with weight W and bias b:

* **linear / pointwise conv**, W ∈ R^{N×C}, truncated SVD W = U S Vᵀ:
  ``y = x Wᵀ + b  ≈  (x V_r)(U_r S_r)ᵀ + b`` — a layer C→r (weight V_rᵀ, no bias) then r→N
  (weight U_r S_r, bias b). A pointwise conv keeps its stride/padding on the first layer.
* **k×k conv, Tucker-2** (``method="tucker2"``), W ∈ R^{N×C×k_h×k_w}: with U_out, U_in the
  leading r_out, r_in left singular vectors of W's output- and input-channel unfoldings (HOSVD)
  and the core G = W ×₀ U_outᵀ ×₁ U_inᵀ,
  ``W ≈ G ×₀ U_out ×₁ U_in`` → 1×1 conv C→r_in (U_inᵀ), k×k conv r_in→r_out (G, the original
  stride/padding/dilation), 1×1 conv r_out→N (U_out, bias b).
* **k×k conv, spatially separable** (``method="separable"``, 2-d only): the SVD of
  M[(c,i),(n,j)] = W[n,c,i,j] gives ``M ≈ (U_r S_r)(V_rᵀ)`` → k_h×1 conv C→r (U_r S_r) with the
  height stride/padding/dilation, then 1×k_w conv r→N (V_rᵀ, bias b) with the width ones.

With ``whiten`` ("svd-llm" | "asvd") linear and pointwise layers are truncated where the
calibration inputs need it least: the SVD is of ``W·S`` with ``S`` a root of the input statistics
and ``Ŵ = U_r (U_rᵀ W)`` (see :mod:`fxcompress.passes._whitening`); the whitened spectrum is the
layer's output error on the calibration data, so ranks and the ``target_macs`` budget follow it.
k×k convs stay data-free (reported in ``details``).

Each factorization is one class in :mod:`fxcompress.passes._factorizations` (its matrices, stages,
reconstruction and MACs). Ranks come from ``rank``, ``energy`` or a global ``target_macs`` budget (see
:mod:`fxcompress.passes._rank_selection`). A layer is rewritten only when the factorized form has
fewer MACs (and, with ``min_speedup``, is measured faster); every other layer is reported skipped.
Grouped and depthwise convs are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxcompress.errors import PassConfigError
from fxcompress.ir import add_constant, attr_use_count, fake_value, get_attr, module_path
from fxcompress.pass_base import Pass, PassContext, PassResult, register_pass
from fxcompress.selectors import first_match
from fxcompress.statistics import calibration_batches
from fxcompress.verify import node_values
from fxcompress.passes import _rank_selection as rs
from fxcompress.passes._rank_budget import RankOption, allocate_budget, scaled_losses
from fxcompress.passes import _refit, _whitening
from fxcompress.passes._rank_sensitivity import model_sensitivities
from fxcompress.passes._factorizations import (
    FACTORIZATIONS, LINEAR, Factorization, Geometry, Stage, factorize, measured_speedup, reconstruct, stage_call, svd,
    format_ranks,
)
from fxcompress.passes._projections import (
    ROUTER_REASON, batched_weight_readers, gemm_arguments, is_projection, routes_experts, weight_matrix,
)

_CONV_DIMS = {torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2}
METHODS = ("tucker2", "separable")
REFITS = ("independent", "sequential")
BUDGET_ERRORS = ("layer", "model")


@dataclass
class _Layer:
    node: fx.Node
    name: str
    kind: str  # "linear", "pointwise", "tucker2" or "separable"
    weight: torch.Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    geometry: Geometry | None
    svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None  # vh None: whitened basis
    whitening: str = "none"
    fit: _refit.Fit | None = None  # refit: the least-squares target and bias of the whitened truncation
    output_root: tuple[torch.Tensor, torch.Tensor] | None = None  # whiten_output: (P, P⁻¹) of the output side

    @property
    def spectra(self) -> list[torch.Tensor]:
        return [s for _, s, _ in self.svds]

    @property
    def full_ranks(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.spectra)

    @property
    def factorization(self) -> Factorization:
        return FACTORIZATIONS[self.kind]

    def macs(self, ranks: tuple[int, ...] | None = None) -> int:
        """Analytic MACs at the recorded shapes: original (``ranks=None``) or factorized."""
        if ranks is not None:
            return self.factorization.macs(self.weight.shape, self.in_shape, self.out_shape, ranks)
        return math.prod(self.out_shape) // self.weight.shape[0] * self.weight.numel()  # output positions × N·C·k


@register_pass
@dataclass(frozen=True)
class LowRank(Pass):
    """Factorize Linear/Conv weights by truncated SVD / Tucker-2 where that saves MACs.

    Exactly one of:
      ``rank``: int (rank per layer, capped at full rank) or float in (0, 1] (fraction of full rank);
      ``energy``: in (0, 1], smallest rank holding that share of the squared singular values;
      ``target_macs``: in (0, 1), fraction of the selected layers' MACs to keep, spread greedily
      over layers by least discarded spectral energy per MAC saved.
    ``method``: how k×k convs are factorized, "tucker2" or "separable".
    ``round_to``: ranks are rounded up to a multiple of it (capped at full rank).
    ``min_speedup``: if set, a layer is rewritten only when its measured CPU/GPU latency improves
    by at least this factor.
    ``whiten``: None (spectrum of W alone), "svd-llm" (input Gram matrix, exact output error) or
    "asvd" (activation-magnitude column scaling), on ``optimize(..., calibration=)`` data.
    ``refit`` (with ``whiten="svd-llm"``): "independent" fits both factors and the bias in closed form to the
    original layer's outputs (centred whitening: the bias absorbs the inputs' mean); "sequential" does
    so on the inputs each layer gets once the layers before it are factorized, so later layers
    compensate earlier errors (see :mod:`fxcompress.passes._refit`). Ranks are chosen first, on the
    original model's statistics.
    ``budget_error`` (``target_macs``): what the budget minimises — "layer": the sum of the layers' own
    relative (whitened: output) errors; "model": each weighted by how much it moves the model's outputs,
    probed once per layer on calibration data (see :mod:`fxcompress.passes._rank_sensitivity`).
    ``whiten_output`` (with ``refit``): two-sided whitening, each output direction weighted by how much it moves
    the model's outputs (gradient Gram, :mod:`fxcompress.passes._output_whitening`).
    ``layer_ranks``: instead of one of those, ``(selector, rank)`` pairs (or a dict): each layer the
    first selector selects gets that rank (int or fraction, as ``rank``); other layers stay as they are.
    ``include``/``ignore``: module selectors (:mod:`fxcompress.selectors`); ``*`` matches within one
    dotted segment, ``**`` across segments (``"encoder.layer.*.output.dense"`` does not match
    ``...attention.output.dense``); a selector covers the module and everything under it.
    """

    name = "low_rank"
    lossless = False

    rank: int | float | None = None
    energy: float | None = None
    target_macs: float | None = None
    method: str = "tucker2"
    round_to: int = 1
    min_speedup: float | None = None
    include: tuple[str, ...] = ("**",)
    ignore: tuple[str, ...] = ()
    whiten: str | None = None
    refit: str | None = None
    budget_error: str = "layer"
    whiten_output: bool = False
    layer_ranks: tuple[tuple[str, int | float], ...] = ()

    def __post_init__(self) -> None:
        """Exactly one of rank/energy/target_macs/layer_ranks, each in range; ``include``/``ignore`` normalised to tuples."""
        object.__setattr__(self, "layer_ranks", rs.checked_layer_ranks(self.layer_ranks))
        chosen = [n for n in ("rank", "energy", "target_macs", "layer_ranks") if getattr(self, n) not in (None, ())]
        if len(chosen) != 1:
            raise PassConfigError(
                f"low_rank needs exactly one of rank=, energy=, target_macs=, layer_ranks=; got {chosen or 'none'}. "
                f"Fix: e.g. LowRank(rank=0.25) or LowRank(energy=0.9) or LowRank(target_macs=0.5)"
            )
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float)):
            raise PassConfigError(f"low_rank rank={rank!r} must be an int >= 1 or a float fraction in (0, 1]")
        if isinstance(rank, int) and rank < 1:
            raise PassConfigError(f"low_rank rank={rank} must be >= 1; for a fraction of full rank pass a float, e.g. 0.25")
        if isinstance(rank, float) and not 0 < rank <= 1:
            raise PassConfigError(f"low_rank rank={rank} as a float is a fraction of full rank and must be in (0, 1]")
        rs.check_fraction("energy", self.energy, closed_top=True)
        rs.check_fraction("target_macs", self.target_macs, closed_top=False)
        if self.method not in METHODS:
            raise PassConfigError(f"low_rank method={self.method!r} is unknown; use one of {METHODS}")
        if self.whiten is not None and self.whiten not in _whitening.METHODS:
            raise PassConfigError(f"low_rank whiten={self.whiten!r} is unknown; use None or one of {_whitening.METHODS}")
        if self.refit is not None and (self.refit not in REFITS or self.whiten != "svd-llm"):
            raise PassConfigError(f"low_rank refit={self.refit!r} needs whiten='svd-llm' and one of {REFITS}; "
                                  f"e.g. LowRank(target_macs=0.5, whiten='svd-llm', refit='sequential')")
        if self.whiten_output and self.refit is None:
            raise PassConfigError("low_rank whiten_output=True needs a refit; "
                                  "e.g. LowRank(target_macs=0.5, whiten='svd-llm', refit='sequential', whiten_output=True)")
        if self.budget_error not in BUDGET_ERRORS:
            raise PassConfigError(f"low_rank budget_error={self.budget_error!r} is unknown; use one of {BUDGET_ERRORS}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise PassConfigError(f"low_rank round_to={self.round_to!r} must be an int >= 1, e.g. 8 (1: no rounding)")
        speedup = self.min_speedup
        if speedup is not None and (isinstance(speedup, bool) or not isinstance(speedup, int | float) or speedup <= 0):
            raise PassConfigError(f"low_rank min_speedup={speedup!r} must be a number > 0, e.g. 1.1, or None")
        for field_name in ("include", "ignore"):
            patterns = getattr(self, field_name)
            patterns = (patterns,) if isinstance(patterns, str) else patterns
            if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) for p in patterns):
                raise PassConfigError(
                    f"low_rank {field_name}={patterns!r} must be glob patterns on module names, "
                    f"e.g. ('encoder.layer.*.output.dense',)"
                )
            object.__setattr__(self, field_name, tuple(patterns))

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        layers = self._collect(gm, ctx, result)
        for weight, op in batched_weight_readers(gm):
            result.skip(weight, f"batched (mixture-of-experts) weights read by {op} are not factorized")
        for layer in layers:
            layer.svds = [svd(m) for m in layer.factorization.matrices(layer.weight)]
        if self.whiten is not None:
            _whitening.whiten_layers(gm, ctx, layers, self.whiten, centred=self.refit is not None, output=self.whiten_output)
        chosen = dict(zip((layer.name for layer in layers), self._choose_ranks(gm, ctx, layers)))
        sequential = []
        for layer in layers:
            ranks = chosen[layer.name]
            if self.refit == "sequential" and layer.fit is not None and (ranks is None or layer.macs(ranks) < layer.macs()):
                sequential.append(layer)
            elif ranks is None:
                result.skip(layer.name, "target_macs budget met without it (other layers lose less energy per MAC)")
            else:
                self._rewrite_if_cheaper(gm, layer, ranks, result)
        _refit.sequential_refit(gm, ctx, sequential, lambda layer: self._rewrite_if_cheaper(gm, layer, chosen[layer.name], result)
                                if chosen[layer.name] else _refit.refit_whole(gm, layer, result))
        rs.warn_rank_one(result.details)
        return result

    def _collect(self, gm: fx.GraphModule, ctx: PassContext, result: PassResult) -> list[_Layer]:
        found = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or (not is_projection(node) and node.target not in _CONV_DIMS):
                continue
            name = _layer_name(node)
            reason = self._unsupported(gm, node, name)
            if reason:
                result.skip(name, reason)
            else:
                found.append(node)
        shapes = _record_shapes(gm, ctx, found)
        layers = []
        for node in found:
            args, name = gemm_arguments(node), _layer_name(node)
            if node not in shapes:
                result.skip(name, "not executed on the example inputs, so its MACs are unknown")
                continue
            weight = weight_matrix(gm, node).detach()
            geometry = None
            if node.target in _CONV_DIMS:
                dims = _CONV_DIMS[node.target]
                geometry = tuple(_expand(args[k], dims) for k in ("stride", "padding", "dilation"))
            kind = _kind(node, weight, self.method)
            layers.append(_Layer(node, name, kind, weight, *shapes[node], geometry))
        return layers

    def _unsupported(self, gm: fx.GraphModule, node: fx.Node, name: str) -> str | None:
        if first_match(self.include, name) is None:
            return f"not matched by include={self.include}"
        matched = first_match(self.ignore, name)
        if matched:
            return f"matched ignore pattern {matched!r}"
        if self.layer_ranks and first_match([s for s, _ in self.layer_ranks], name) is None:
            return "not selected by layer_ranks"
        args = gemm_arguments(node)
        weight = args["weight"]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return "weight is computed in the graph, not a stored parameter; cannot factorize it"
        if routes_experts(node):
            return ROUTER_REASON
        uses = attr_use_count(gm, weight.target)
        if uses > 1:
            return f"weight {weight.target!r} is used {uses} times; factorizing one use would duplicate it"
        if not get_attr(gm, weight.target).is_floating_point():
            return "weight is not floating point"
        if node.target in _CONV_DIMS:
            if args["groups"] != 1:
                return f"grouped/depthwise conv (groups={args['groups']}): channel factorization would mix groups"
            kernel = get_attr(gm, weight.target).shape[2:]
            if self.method == "separable" and len(kernel) != 2 and math.prod(kernel) > 1:
                return "method='separable' applies to 2-d convs only"
        return None

    def _choose_ranks(self, gm: fx.GraphModule, ctx: PassContext, layers: list[_Layer]) -> list[tuple[int, ...] | None]:
        if self.target_macs is not None:
            options = [_rank_options(layer, rs.candidate_ranks(layer.spectra, self.round_to)) for layer in layers]
            if self.budget_error == "model":
                options = self._model_weighted(gm, ctx, layers, options)
            chosen = allocate_budget([layer.macs() for layer in layers], options, self.target_macs)
            return [option.ranks if option else None for option in chosen]
        ranks = []
        by_layer = dict(self.layer_ranks)
        for layer in layers:
            rank = by_layer[first_match(list(by_layer), layer.name)] if self.layer_ranks else self.rank
            per_mode = []
            for spectrum in layer.spectra:
                full = len(spectrum)
                raw = rs.rank_from_spec(rank, full) if rank is not None else rs.rank_for_energy(spectrum, self.energy)
                per_mode.append(rs.round_rank(raw, self.round_to, full))
            ranks.append(tuple(per_mode))
        return ranks

    def _model_weighted(self, gm: fx.GraphModule, ctx: PassContext, layers: list[_Layer],
                        options: list[list[RankOption]]) -> list[list[RankOption]]:
        """``options`` with each layer's loss scaled by its probed model-output sensitivity (the median where unprobed)."""
        probes = []
        for layer, layer_options in zip(layers, options):
            cheaper = [o for o in layer_options if o.macs < layer.macs()] or layer_options
            probes.append(min(cheaper, key=lambda o: abs(o.macs - self.target_macs * layer.macs())))
        sensitivities = model_sensitivities(
            gm, calibration_batches(ctx), layers, [p.loss for p in probes],
            lambda layer: _refit.approximation(gm, layer, probes[layers.index(layer)].ranks))
        return scaled_losses(options, sensitivities)

    def _rewrite_if_cheaper(self, gm: fx.GraphModule, layer: _Layer, ranks: tuple[int, ...], result: PassResult) -> None:
        before, after = layer.macs(), layer.macs(ranks)
        rank_text = format_ranks(ranks)
        if after >= before:
            result.skip(layer.name, f"factorized at rank {rank_text} costs {after} MACs >= {before} unfactorized")
            return
        stages = _refit.factorized(layer, ranks)
        row = {
            "layer": layer.name,
            "kind": layer.kind,
            "full_rank": format_ranks(layer.full_ranks),
            "rank": rank_text,
            "macs_before": before,
            "macs_after": after,
            "rel_error": _relative_error(layer, stages),
        }
        if self.whiten is not None:
            row["whitening"] = layer.whitening
            if layer.svds[0][2] is None:  # the discarded whitened energy: output error on the calibration data
                row["output_rel_error"] = math.sqrt(max(rs.discarded_energy(layer.spectra[0], ranks[0]), 0.0))
        if self.min_speedup is not None:
            speedup = measured_speedup(layer.node.target if layer.geometry else LINEAR, layer.weight, layer.in_shape,
                                       layer.geometry, stages)
            row["speedup"] = speedup
            if speedup < self.min_speedup:
                result.skip(layer.name, f"measured speedup {speedup:.2f}x < min_speedup {self.min_speedup}")
                return
        _emit(gm, layer, stages, _refit.refit_bias(gm, layer, stages))
        result.rewritten.append(layer.name)
        result.details.append(row)


def _layer_name(node: fx.Node) -> str:
    """The user's module name, or for a top-level layer the weight's attribute name."""
    return module_path(node) or str(getattr(gemm_arguments(node)["weight"], "target", node.name))


def _expand(value: int | list[int], dims: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


def _kind(node: fx.Node, weight: torch.Tensor, method: str) -> str:
    if node.target not in _CONV_DIMS:
        return "linear"
    return "pointwise" if math.prod(weight.shape[2:]) == 1 else method


def _rank_options(layer: _Layer, candidates: list[tuple[int, ...]]) -> list[RankOption]:
    """MACs and discarded energy (summed over the spectra) of every candidate, from one cumulative sum per spectrum."""
    kept = [rs.energy_kept(s).tolist() for s in layer.spectra]
    return [RankOption(ranks, layer.macs(ranks), sum(1.0 - k[r - 1] if r > 0 else 1.0 for k, r in zip(kept, ranks)))
            for ranks in candidates]


def _relative_error(layer: _Layer, stages: list[Stage]) -> float:
    weight = layer.weight.float()
    norm = torch.linalg.vector_norm(weight)
    error = torch.linalg.vector_norm(weight - reconstruct(layer.kind, stages))
    return float(error / norm) if norm > 0 else 0.0


def _emit(gm: fx.GraphModule, layer: _Layer, stages: list[Stage], new_bias: torch.Tensor | None = None) -> None:
    node, graph = layer.node, gm.graph
    args = gemm_arguments(node)
    value = args["input"]
    if new_bias is not None:
        args["bias"] = add_constant(gm, f"{layer.name or node.name}_lowrank_bias", new_bias, before=node)
    for i, stage in enumerate(stages):
        weight = add_constant(gm, f"{layer.name or node.name}_lowrank{i}", stage.weight, before=node)
        bias = args["bias"] if i == len(stages) - 1 else None
        op, tail = stage_call(stage)
        with graph.inserting_before(node):
            value = graph.call_function(op, (value, weight, bias, *tail))
        value.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        fake = fake_value(op, value.args)
        if fake is not None:
            value.meta["val"] = fake
    node.replace_all_uses_with(value)
    graph.erase_node(node)


def _record_shapes(gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node]) -> dict[fx.Node, tuple]:
    """Concrete (input shape, output shape) of ``nodes`` on the example inputs."""
    if not nodes:
        return {}
    inputs = {n: gemm_arguments(n)["input"].name for n in nodes}
    values = node_values(gm, ctx.args, ctx.kwargs, {n.name for n in nodes} | set(inputs.values()))
    return {n: (tuple(values[inputs[n]].shape), tuple(values[n.name].shape)) for n in nodes}
