"""Calibration statistics of GEMM-layer inputs: one streaming pass, bounded memory, cached per node.

For a ``linear`` / ``conv1d`` / ``conv2d`` node with input ``x`` the *features* are the columns its
weight multiplies: the last dim of ``x`` for a linear (every other dim flattened into rows, i.e.
tokens), the ``C·k_h·k_w`` unfolded patches for a convolution (``F.unfold`` with the conv's
stride/padding/dilation, so padding zeros count exactly as the conv sees them). Over all rows ``X``
of all calibration batches the collector accumulates

* ``gram = XᵀX`` (K×K) and ``feature_sum = Xᵀ1`` (K) — skipped, with the reason, when K exceeds
  ``max_gram_features`` (huge k×k convs) or the conv is grouped;
* per input *channel* ``c`` (the linear's feature, the conv's dim 1): ``Σx``, ``Σx²``, ``Σ|x|``, ``max|x|``
  and the number of positions — always (the diagonal fallback);
* with a ``reference`` graph (the uncompressed model, same node names) run on the same batch: the
  cross Gram matrix ``X̂ᵀX`` between this graph's rows ``X̂`` and the reference's rows ``X`` and ``Xᵀ1``
  — what a refit needs to map the compressed model's inputs back to the original outputs (sequential
  calibration).

A batch with an ``attention_mask`` keyword input (Hugging Face) counts only the token rows the mask
keeps, for linears whose input is batch × tokens × features like the mask: padding positions are
computed by the model but never read, and would otherwise be most of the rows of short sentences.

Nothing else is kept: each batch's activations are released as soon as the interpreter is past their
last use (``fx.Interpreter`` frees dead values), so memory is the size of the statistics, whatever
the number of batches. Per-batch sums are taken in fp32 and accumulated in fp64. The interpreter is a
:class:`ValueRecorder`, the early-stopping run the passes' paired runs (refits) use to keep values.

:func:`layer_statistics` is what a pass calls: it reads the calibration data from the
:class:`~fxcompress.pass_base.PassContext` (``optimize(..., calibration=data)``; the example inputs
when none was given) and caches the result as an analysis keyed by the node and a signature of
everything upstream of it (op, arguments, and identity/version of every parameter read), so a pass
that rewrites the node or anything feeding it invalidates exactly the statistics it changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx._pytree import tree_flatten_spec
from tqdm.auto import tqdm

from fxcompress import ir
from fxcompress.errors import InvalidInputError
from fxcompress.training import Batch

MAX_GRAM_FEATURES = 4096
"""Above this many features (K = C·k_h·k_w) a layer gets diagonal statistics only (K² fp64 would not fit)."""

LAYER_OPS = {
    torch.ops.aten.linear.default: 0,
    torch.ops.aten.conv1d.default: 1,
    torch.ops.aten.conv2d.default: 2,
}


@dataclass
class InputStatistics:
    """Accumulated statistics of one layer's input (see the module docstring)."""

    channels: int
    positions: int = 0  # samples per channel (tokens, or N·H·W)
    channel_sum: torch.Tensor | None = None
    channel_sq: torch.Tensor | None = None
    channel_abs: torch.Tensor | None = None
    channel_absmax: torch.Tensor | None = None
    rows: int = 0  # rows of the unfolded input X
    gram: torch.Tensor | None = None
    feature_sum: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # X̂ᵀX with X the reference graph's rows (paired collection only)
    reference_feature_sum: torch.Tensor | None = None  # Xᵀ1 of the reference rows
    reason: str = ""  # why ``gram`` is None

    @property
    def channel_mean(self) -> torch.Tensor:
        return self.channel_sum / max(self.positions, 1)

    def centered_channel_norm(self) -> torch.Tensor:
        """``‖x_c − mean_c‖₂`` over all positions: the fluctuation a removed channel leaves after bias compensation."""
        return (self.channel_sq - self.channel_sum.square() / max(self.positions, 1)).clamp(min=0).sqrt()

    def nbytes(self) -> int:
        tensors = (self.channel_sum, self.channel_sq, self.channel_abs, self.channel_absmax, self.gram, self.feature_sum,
                   self.cross, self.reference_feature_sum)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layer_features(node: fx.Node, x: torch.Tensor) -> torch.Tensor | None:
    """The rows ``X`` (rows × K) the layer's weight multiplies, or ``None`` for a grouped conv."""
    args = ir.call_arguments(node)
    dims = LAYER_OPS[node.target]
    if dims == 0:
        return x.reshape(-1, x.shape[-1])
    if args["groups"] != 1:
        return None
    if isinstance(args["padding"], str):
        return None
    kernel = list(weight_shape(node)[2:])
    stride, padding, dilation = (_expand(args[k], dims) for k in ("stride", "padding", "dilation"))
    if dims == 1:  # a conv1d is a conv2d over a height-1 image
        x, kernel, stride, padding, dilation = x.unsqueeze(-2), [1, *kernel], [1, *stride], [0, *padding], [1, *dilation]
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # N × K × L
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def weight_shape(node: fx.Node) -> tuple:
    weight = ir.call_arguments(node)["weight"]
    if weight.op == "get_attr":
        return tuple(ir.get_attr(node.graph.owning_module, weight.target).shape)
    return ir.fake_shape(weight)


def _expand(value, dims: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


class _Accumulator:
    def __init__(self, node: fx.Node, want_gram: bool, max_gram_features: int):
        self.node = node
        self.want_gram = want_gram
        self.max_gram_features = max_gram_features
        self.stats: InputStatistics | None = None

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> None:
        x = self._batched(x.detach())
        channel_dim = 1 if LAYER_OPS[self.node.target] else -1
        channels = x.shape[channel_dim]
        if self.stats is None:
            self.stats = self._empty(channels, x)
        s = self.stats
        keep = kept_tokens(x, token_mask) if channel_dim == -1 else None
        select = (lambda rows: rows[keep]) if keep is not None else (lambda rows: rows)  # noqa: E731
        per_channel = select(x.float().movedim(channel_dim, -1).reshape(-1, channels))
        s.positions += per_channel.shape[0]
        s.channel_sum += per_channel.sum(0).double()
        s.channel_sq += per_channel.square().sum(0).double()
        s.channel_abs += per_channel.abs().sum(0).double()
        torch.maximum(s.channel_absmax, per_channel.abs().amax(0).double(), out=s.channel_absmax)
        if s.gram is not None:
            rows = select(layer_features(self.node, x.float()))
            s.rows += rows.shape[0]
            s.gram += (rows.T @ rows).double()
            s.feature_sum += rows.sum(0).double()
            if reference is not None:
                reference_rows = select(layer_features(self.node, self._batched(reference.detach()).float()))
                s.cross = (rows.T @ reference_rows).double() + (0 if s.cross is None else s.cross)
                reference_sum = reference_rows.sum(0).double()
                s.reference_feature_sum = reference_sum + (0 if s.reference_feature_sum is None else s.reference_feature_sum)

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        spatial_dims = LAYER_OPS[self.node.target]
        return x.unsqueeze(0) if spatial_dims and x.dim() == spatial_dims + 1 else x  # an unbatched conv input

    def _empty(self, channels: int, x: torch.Tensor) -> InputStatistics:
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=x.device)  # noqa: E731
        stats = InputStatistics(channels, channel_sum=zeros(channels), channel_sq=zeros(channels), channel_abs=zeros(channels),
                                channel_absmax=zeros(channels))
        if not self.want_gram:
            stats.reason = "only diagonal statistics were requested"
            return stats
        shape = weight_shape(self.node)
        features = math.prod(shape[1:])
        if len(shape) > 2 and layer_features(self.node, x[:1].float()) is None:
            stats.reason = "grouped or string-padded conv: no single input Gram matrix; diagonal statistics only"
        elif features > self.max_gram_features:
            stats.reason = (f"{features} input features (C·kernel) > {self.max_gram_features}: the Gram matrix would need "
                            f"{features ** 2 * 8 / 2 ** 20:.0f} MiB; diagonal statistics only")
        else:
            stats.gram = torch.zeros(features, features, dtype=torch.float64, device=x.device)
            stats.feature_sum = zeros(features)
        return stats


def kept_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Rows of a linear's input to count: where ``token_mask`` (a batch's ``attention_mask``, batch × tokens)
    is nonzero, if the input's leading dims are the mask's; ``None``: every row."""
    if token_mask is None or x.dim() != token_mask.dim() + 1 or tuple(x.shape[:-1]) != tuple(token_mask.shape):
        return None
    return token_mask.reshape(-1).to(device=x.device) != 0


class _AllRecorded(Exception):
    """Every value this run needs exists: the rest of the graph need not run."""


class ValueRecorder(fx.Interpreter):
    """Runs a graph on one batch and keeps the values of chosen nodes, stopping once they all exist
    (``stop=False``: the whole graph runs, e.g. for a backward pass from its outputs).

    ``names``: node names (a value is kept under its node's name) or a mapping key → node name (one node
    may serve several keys: :func:`input_recorder` keeps layers' inputs under the layers' names). A
    subclass changes what is kept by overriding :meth:`keep`.
    """

    def __init__(self, gm: fx.GraphModule, names: Iterable[str] | Mapping[str, str], *, stop: bool = True):
        super().__init__(gm)
        self.stop = stop
        self.keys: dict[str, list[str]] = {}  # node name → the keys its value is kept under
        pairs = names.items() if isinstance(names, Mapping) else ((name, name) for name in names)
        for key, node_name in pairs:
            self.keys.setdefault(node_name, []).append(key)
        self.recorded: dict[str, Any] = {}
        self._pending = 0  # nodes of ``keys`` not yet run in this run

    def record(self, *args: Any) -> dict[str, Any]:
        """The kept values of one run on the graph's flat inputs ``args``, by key."""
        self.run(*args)
        return self.recorded

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The graph's output, ``None`` if the run stopped early; the kept values are left in ``recorded``."""
        self.recorded, self._pending = {}, len(self.keys)
        try:
            return super().run(*args, **kwargs)
        except _AllRecorded:
            return None
        finally:
            self.env.clear()

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        keys = self.keys.get(node.name)
        if keys:
            self.keep(keys, value)
            self._pending -= 1
            if self.stop and not self._pending:
                raise _AllRecorded
        return value

    def keep(self, keys: list[str], value: Any) -> None:
        for key in keys:
            self.recorded[key] = value


def input_recorder(gm: fx.GraphModule, layers: Iterable[str]) -> ValueRecorder:
    """A :class:`ValueRecorder` of the inputs of ``gm``'s layer nodes named ``layers``, kept under the layers'
    names (a name ``gm`` lacks is not kept)."""
    names = set(layers)
    return ValueRecorder(gm, _input_names(node for node in gm.graph.nodes if node.name in names))


def _input_names(layers: Iterable[fx.Node]) -> dict[str, str]:
    """Layer name → the name of its input node."""
    return {node.name: ir.call_arguments(node)["input"].name for node in layers}


class _StatisticsInterpreter(ValueRecorder):
    """Runs one batch and hands each accumulator its layers' input as soon as it exists (nothing is kept),
    stopping after the last one."""

    def __init__(self, gm: fx.GraphModule, accumulators: dict[fx.Node, _Accumulator]):
        super().__init__(gm, _input_names(node for node in gm.graph.nodes if node in accumulators))  # graph order
        self.accumulators = {node.name: accumulator for node, accumulator in accumulators.items()}
        self.references: dict[str, torch.Tensor] = {}  # layer name → the reference graph's input (paired runs)
        self.token_mask: torch.Tensor | None = None  # the batch's attention_mask: padding rows are not counted

    def keep(self, keys: list[str], value: Any) -> None:
        fed = set()  # an accumulator shared by layers reading the same features counts the rows once
        for key in keys:
            accumulator = self.accumulators[key]
            if id(accumulator) not in fed:
                fed.add(id(accumulator))
                accumulator.add(value, self.references.get(key), self.token_mask)


def collect_statistics(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    nodes: Iterable[fx.Node],
    *,
    gram: bool = True,
    max_gram_features: int = MAX_GRAM_FEATURES,
    progress: bool | None = None,
    reference: fx.GraphModule | None = None,
) -> dict[str, InputStatistics]:
    """Stream ``batches`` through ``gm`` once; statistics of the input of every node in ``nodes``, by node name.

    A batch follows :meth:`fxcompress.training.Batch.of` (a tensor, a tuple of inputs with optional
    labels, a dict of keyword inputs); labels are dropped. ``progress=None`` shows a bar on a terminal.
    Each batch runs only as far as the last requested layer. A linear's token rows that the batch's
    ``attention_mask`` keyword input marks as padding (0) are not counted (Hugging Face convention). With ``reference`` (a graph with the
    same node names, e.g. the uncompressed original) each batch also runs through it and the Gram
    statistics gain the cross terms ``X̂ᵀX`` and ``Xᵀ1`` with its inputs (a node it lacks gets none).
    """
    nodes = list(nodes)
    unsupported = [n.name for n in nodes if n.target not in LAYER_OPS]
    if unsupported:
        raise ValueError(f"collect_statistics: nodes {unsupported} are not linear/conv1d/conv2d calls")
    shared: dict[tuple, _Accumulator] = {}
    accumulators = {node: shared.setdefault(_features_key(node), _Accumulator(node, gram, max_gram_features)) for node in nodes}
    interpreter = _StatisticsInterpreter(gm, accumulators)
    recorder = input_recorder(reference, {n.name for n in nodes}) if reference is not None else None
    seen = 0
    with torch.no_grad():
        for item in tqdm(batches, desc="calibration statistics", unit="batch", disable=None if progress is None else not progress, leave=False):
            batch = item if isinstance(item, Batch) else Batch.of(item)
            if recorder is not None:
                interpreter.references = recorder.record(*flat_inputs(batch, getattr(reference, "_in_spec", None)))
            mask = batch.kwargs.get("attention_mask")
            interpreter.token_mask = mask if isinstance(mask, torch.Tensor) else None
            interpreter.run(*flat_inputs(batch, getattr(gm, "_in_spec", None)))
            interpreter.references = {}
            seen += 1
    if not seen:
        raise InvalidInputError("calibration data is empty; pass at least one batch of representative inputs")
    return {node.name: acc.stats for node, acc in accumulators.items() if acc.stats is not None}


def flat_inputs(item: Any, in_spec: Any) -> list:
    """One calibration batch (see :meth:`fxcompress.training.Batch.of`) as the captured graph's flat placeholders."""
    batch = item if isinstance(item, Batch) else Batch.of(item)
    return tree_flatten_spec((batch.args, batch.kwargs), in_spec) if in_spec else list(batch.args)


def _features_key(node: fx.Node) -> tuple:
    """Layers with equal keys multiply the same rows (q/k/v projections of one input): one accumulator."""
    args = ir.call_arguments(node)
    if node.target is torch.ops.aten.linear.default:
        return ("linear", args["input"])
    return (node.target, args["input"], weight_shape(node)[1:], *(str(args[k]) for k in ("stride", "padding", "dilation", "groups")))


# --- the cached analysis -------------------------------------------------------------------------------


def check_calibration(data: Any) -> Any:
    """``data`` must be re-iterable (a list, a DataLoader): every pass that needs statistics reads it again."""
    if data is None:
        return None
    try:
        iterator = iter(data)
    except TypeError:
        raise InvalidInputError(
            f"calibration= must be an iterable of batches (a DataLoader or a list), not {type(data).__name__}"
        ) from None
    if iterator is data:
        raise InvalidInputError(
            "calibration= is a one-shot iterator (generator); passes read it once per analysis, so pass a list or a DataLoader"
        )
    return data


@dataclass
class StatisticsCache:
    """Statistics by ``(node name, gram?)``, each with the upstream signature it was computed for."""

    entries: dict[tuple[str, bool], tuple[tuple, InputStatistics]] = field(default_factory=dict)
    collections: int = 0  # streaming passes run so far (for tests and reports)


def layer_statistics(gm: fx.GraphModule, ctx: Any, nodes: list[fx.Node], *, gram: bool = True) -> dict[str, InputStatistics]:
    """Statistics of ``nodes``' inputs on ``ctx``'s calibration data (its example inputs if none), cached.

    Missing or invalidated entries are collected together in one streaming pass. A node whose
    input never ran on the data is absent from the result.
    """
    cache: StatisticsCache = ctx.analyses.setdefault("input_statistics", StatisticsCache())
    signatures = {node: upstream_signature(gm, node) for node in nodes}
    result, missing = {}, []
    for node in nodes:
        hit = cache.entries.get((node.name, gram)) or (cache.entries.get((node.name, True)) if not gram else None)
        if hit is not None and hit[0] == signatures[node]:
            result[node.name] = hit[1]
        else:
            missing.append(node)
    if missing:
        collected = collect_statistics(gm, calibration_batches(ctx), missing, gram=gram)
        cache.collections += 1
        for node in missing:
            if node.name in collected:
                cache.entries[(node.name, gram)] = (signatures[node], collected[node.name])
                result[node.name] = collected[node.name]
    return result


def calibration_batches(ctx: Any) -> Any:
    """``ctx``'s calibration data, or its example inputs as the one batch when none was given."""
    return ctx.calibration if ctx.calibration is not None else [Batch(ctx.args, ctx.kwargs)]


def upstream_signature(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """What a node's input statistics depend on: every ancestor's op and arguments, and every parameter's identity."""
    seen, stack, parts = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            value = ir.get_attr(gm, current.target)
            parts.append((current.name, current.target, id(value), getattr(value, "_version", 0), tuple(getattr(value, "shape", ()))))
        else:
            parts.append((current.name, current.op, str(current.target), str(current.args), str(current.kwargs)))
        stack.extend(current.all_input_nodes)
    return tuple(sorted(parts, key=str))
