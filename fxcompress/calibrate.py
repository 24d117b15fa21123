"""Calibration for static int8: observe the inputs of every linear/conv layer (and the outputs of the
int8 conv chains), fix their scales.

``calibrate(model, batches)`` returns ``((site, s), ...)`` with the per-tensor scale ``s = r / 127``
of each site's value, where a site is a linear/conv1d/conv2d layer's input (``"layer"``) or, for
convs, the output of the chain the static int8 lowering fuses (``"layer:out"``: after relu/ReLU6 or
the residual add; ``"layer:conv"``: the conv before a fused add). Conv sites are observed on a
BN-folded copy of the graph (``fold_bn`` runs before ``int8``). The range ``r`` is

* ``minmax``:     ``max over batches of max |x|``;
* ``percentile``: the mean over batches of the ``percentile``-th percentile of ``|x|`` (clips outliers);
* ``mse``:        the clipping range minimising ``E[(x − Q_r(x))²]`` for 8-bit quantization over
  ``[0, r]`` (nonnegative values) or ``[−r, r]``, by grid search over a random sample of the values.

Feed the result to ``Int8(mode="static", activation_scales=...)``: it is plain data (a tuple of
pairs), so the pass configuration stays printable and saveable.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.fx._pytree import tree_flatten_spec

from .capture import capture
from .errors import InvalidInputError
from .inputs import Inputs
from .manager import apply_pass
from .pass_base import PassContext
from .quiet import progress_bar, quiet
from .training import Batch

METHODS = ("minmax", "percentile", "mse")
MAX_PERCENTILE_SAMPLES = 1 << 22
MSE_SAMPLES_PER_BATCH, MSE_SAMPLES = 1 << 16, 1 << 18
MSE_GRID = 100


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
    if method not in METHODS:
        raise InvalidInputError(f"calibrate: method must be one of {METHODS}, not {method!r}")
    if not 0 < percentile <= 100:
        raise InvalidInputError(f"calibrate: percentile must be in (0, 100], not {percentile}")
    if isinstance(batches, torch.Tensor | dict):
        raise InvalidInputError("calibrate: batches is one batch; pass a list of batches or a DataLoader, e.g. [x]")
    batches = [Batch.of(b) for b in batches]
    if not batches:
        raise InvalidInputError("calibrate: batches is empty; pass at least one batch of representative inputs")
    first = Inputs.of(batches[0])
    gm = _folded(copy.deepcopy(model) if isinstance(model, fx.GraphModule) else capture(model, first), first)
    observer = _RangeObserver(gm, method, percentile)
    with torch.no_grad(), progress_bar(progress, total=len(batches), desc="calibrate", unit="batch") as bar:
        for batch in batches:
            observer.run(*_positional(gm, batch))
            bar.update(1)
    return tuple((layer, max(r, 1e-8) / 127.0) for layer, r in sorted(observer.ranges().items()))


def _folded(gm: fx.GraphModule, inputs: Inputs) -> fx.GraphModule:
    """``gm`` with BN folded (conv output ranges as the int8 pass sees them after ``fold_bn``)."""
    from fxcompress.passes.fold_bn import FoldBN  # here: the passes load on first use, import fxcompress stays fast

    apply_pass(FoldBN(), gm, PassContext.of(inputs))
    return gm


def _positional(gm: fx.GraphModule, batch: Any) -> list:
    """``fx.Interpreter.run`` takes the graph's flat inputs: flatten ``(args, kwargs)`` as the module's call does."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        if batch.kwargs:
            raise InvalidInputError("calibrate: keyword inputs need a captured model (pass the nn.Module, not a graph)")
        return list(batch.args)
    return list(tree_flatten_spec((batch.args, batch.kwargs), spec))


class _RangeObserver(fx.Interpreter):
    """Runs the graph and records the range of every site's value (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, method: str, percentile: float):
        from fxcompress.passes._int8_conv import calibration_sites  # here, as in _folded: import speed
        from fxcompress.passes._projections import gemm_arguments
        from fxcompress.passes.int8 import gemm_candidates, layer_name

        super().__init__(gm)
        self.method = method
        self.quantile = percentile / 100.0
        self.sites: dict[fx.Node, list[str]] = {}
        for node in gemm_candidates(gm):
            self.sites.setdefault(gemm_arguments(node)["input"], []).append(layer_name(node))
        for site, node in calibration_sites(gm).items():
            self.sites.setdefault(node, []).append(site)
        self.observed: dict[str, list] = {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node in self.sites and isinstance(value, torch.Tensor):
            observation = self._observe(value.detach())
            for site in self.sites[node]:
                self.observed.setdefault(site, []).append(observation)
        return value

    def _observe(self, x: torch.Tensor):
        magnitudes = x.abs().flatten().float()
        if self.method == "minmax":
            return magnitudes.max().item()
        if self.method == "mse":
            sample = magnitudes if magnitudes.numel() <= MSE_SAMPLES_PER_BATCH else magnitudes[
                torch.randint(magnitudes.numel(), (MSE_SAMPLES_PER_BATCH,), device=x.device)]
            return sample, bool(x.min() >= 0)
        if magnitudes.numel() > MAX_PERCENTILE_SAMPLES:
            magnitudes = magnitudes[torch.randperm(magnitudes.numel(), device=x.device)[:MAX_PERCENTILE_SAMPLES]]
        k = max(1, min(magnitudes.numel(), round(self.quantile * magnitudes.numel())))
        return magnitudes.kthvalue(k).values.item()

    def ranges(self) -> dict[str, float]:
        if self.method == "minmax":
            return {site: max(values) for site, values in self.observed.items()}
        if self.method == "mse":
            return {site: mse_optimal_range(values) for site, values in self.observed.items()}
        return {site: sum(values) / len(values) for site, values in self.observed.items()}


def mse_optimal_range(observations: list[tuple[torch.Tensor, bool]]) -> float:
    """The clip ``r`` of 8-bit quantization with the least squared error on the sampled magnitudes.

    Nonnegative values use 255 steps of ``r/255`` over ``[0, r]``, signed ones 255 steps of ``2r/255``
    over ``[−r, r]``; magnitudes above ``r`` clip to ``r``.
    """
    sample = torch.cat([s for s, _ in observations]).double()
    if sample.numel() > MSE_SAMPLES:
        sample = sample[torch.randperm(sample.numel())[:MSE_SAMPLES]]
    steps = 255.0 if all(nonnegative for _, nonnegative in observations) else 127.5
    top = sample.max().item()
    if top <= 0:
        return 0.0
    best, best_error = top, float("inf")
    for r in torch.linspace(top / MSE_GRID, top, MSE_GRID).tolist():
        step = r / steps
        error = (torch.round(sample.clamp(max=r) / step) * step - sample).square().mean().item()
        if error < best_error:
            best, best_error = r, error
    return best
