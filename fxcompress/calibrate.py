"""Calibration for static int8: observe the inputs of every linear/1×1-conv layer, fix their scales.

``calibrate(model, batches)`` returns ``((layer, s_x), ...)`` with the per-tensor activation scale
``s_x = r / 127`` of each layer's input, where the range ``r`` is

* ``minmax``:     ``max over batches of max |x|``;
* ``percentile``: the mean over batches of the ``percentile``-th percentile of ``|x|`` (clips outliers).

Feed the result to ``Int8(mode="static", activation_scales=...)``: it is plain data (a tuple of
pairs), so the pass configuration stays printable and saveable.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from .capture import ExampleInputs, capture
from .errors import InvalidInputError
from .quiet import progress_bar, quiet

METHODS = ("minmax", "percentile")
MAX_PERCENTILE_SAMPLES = 1 << 22


@quiet
def calibrate(
    model: torch.nn.Module, batches: Iterable[Any], method: str = "minmax", percentile: float = 99.99,
    *, progress: bool | None = None,
) -> tuple[tuple[str, float], ...]:
    """Run ``batches`` and return per-layer input scales; ``model`` is not changed.

    A batch follows the convention of :mod:`fxcompress.training` (what ``distill`` reads): a tensor,
    a dict of keyword inputs (Hugging Face style; a ``"labels"`` entry is dropped), or
    ``(inputs, labels)`` as a ``DataLoader`` yields it (labels are dropped).
    """
    from .training import Batch

    if method not in METHODS:
        raise InvalidInputError(f"calibrate: method must be one of {METHODS}, not {method!r}")
    if not 0 < percentile <= 100:
        raise InvalidInputError(f"calibrate: percentile must be in (0, 100], not {percentile}")
    if isinstance(batches, torch.Tensor | dict):
        raise InvalidInputError("calibrate: batches is one batch; pass a list of batches or a DataLoader, e.g. [x]")
    batches = [Batch.of(b) for b in batches]
    if not batches:
        raise InvalidInputError("calibrate: batches is empty; pass at least one batch of representative inputs")
    first = ExampleInputs(batches[0].args, batches[0].kwargs)
    gm = model if isinstance(model, fx.GraphModule) else capture(model, first)
    observer = _RangeObserver(gm, method, percentile)
    with torch.no_grad(), progress_bar(progress, total=len(batches), desc="calibrate", unit="batch") as bar:
        for batch in batches:
            observer.run(*_positional(gm, batch))
            bar.update(1)
    return tuple((layer, max(r, 1e-8) / 127.0) for layer, r in sorted(observer.ranges().items()))


def _positional(gm: fx.GraphModule, batch: Any) -> list:
    """``fx.Interpreter.run`` takes the graph's flat inputs: flatten ``(args, kwargs)`` as the module's call does."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        if batch.kwargs:
            raise InvalidInputError("calibrate: keyword inputs need a captured model (pass the nn.Module, not a graph)")
        return list(batch.args)
    from torch.fx._pytree import tree_flatten_spec

    return list(tree_flatten_spec((batch.args, batch.kwargs), spec))


class _RangeObserver(fx.Interpreter):
    """Runs the graph and records the absolute range of the input of every int8 GEMM candidate."""

    def __init__(self, gm: fx.GraphModule, method: str, percentile: float):
        from fxcompress.passes._projections import gemm_arguments
        from fxcompress.passes.int8 import gemm_candidates, layer_name

        super().__init__(gm)
        self.method = method
        self.quantile = percentile / 100.0
        self.layers = {node: layer_name(node) for node in gemm_candidates(gm)}
        self.inputs = {node: gemm_arguments(node)["input"] for node in self.layers}
        self.observed: dict[str, list[float]] = {}

    def run_node(self, node: fx.Node) -> Any:
        if node in self.layers:
            x = self.env[self.inputs[node]]
            self.observed.setdefault(self.layers[node], []).append(self._range(x.detach()))
        return super().run_node(node)

    def _range(self, x: torch.Tensor) -> float:
        magnitudes = x.abs().flatten().float()
        if self.method == "minmax":
            return magnitudes.max().item()
        if magnitudes.numel() > MAX_PERCENTILE_SAMPLES:
            magnitudes = magnitudes[torch.randperm(magnitudes.numel(), device=x.device)[:MAX_PERCENTILE_SAMPLES]]
        k = max(1, min(magnitudes.numel(), round(self.quantile * magnitudes.numel())))
        return magnitudes.kthvalue(k).values.item()

    def ranges(self) -> dict[str, float]:
        if self.method == "minmax":
            return {layer: max(values) for layer, values in self.observed.items()}
        return {layer: sum(values) / len(values) for layer, values in self.observed.items()}
