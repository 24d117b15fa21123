"""How much a layer's own output error moves the model's outputs: the weights of ``low_rank``'s
``budget_error="model"`` rank allocation.

A layer's whitened spectrum gives its own relative output error ``ε_l(r)`` at every rank exactly,
but not what that error does downstream: an error in a query projection goes through a softmax, one
in a residual branch lands on the output almost unchanged. So each layer is probed once: on a few
calibration batches the graph runs with only that layer replaced by its rank-``r_l`` approximation
(``r_l`` the rank that would meet the MAC target uniformly), and

    s_l = D_l / ε_l(r_l),   D_l = ‖f̂(x) − f(x)‖² / ‖f(x)‖²   (all graph outputs, the probe batches)

is the model-output error per unit of layer error. The budget then minimises ``Σ_l s_l ε_l(r)``, the
first-order (errors add) estimate of the model's output error, instead of ``Σ_l ε_l(r)``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fxcompress.statistics import LAYER_OPS, flat_inputs

PROBE_BATCHES = 4
"""Calibration batches each layer's probe runs on (one forward per layer and batch)."""


class _Substituted(fx.Interpreter):
    """Runs the graph with one node's weight and bias arguments replaced."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.node: fx.Node | None = None
        self.weight_bias: tuple[torch.Tensor, torch.Tensor | None] = ()

    def run_node(self, node: fx.Node) -> Any:
        if node is not self.node:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        args = (args[0], *self.weight_bias, *args[3:])
        return node.target(*args, **kwargs)


def _outputs(value: Any) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tree_leaves(value) if isinstance(t, torch.Tensor)])


def model_sensitivities(gm: fx.GraphModule, batches: Iterable, layers: list, layer_errors: list[float],
                        approximate: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]]) -> list[float | None]:
    """``s_l`` per layer (``None`` where the probe does not apply: its own error is 0, or its form is not a
    linear/conv call); ``approximate(layer)`` gives the probe's replacement weight and bias."""
    in_spec = getattr(gm, "_in_spec", None)
    probes = [flat_inputs(batch, in_spec) for batch in itertools.islice(batches, PROBE_BATCHES)]
    interpreter = _Substituted(gm)
    with torch.no_grad():
        references = [_outputs(interpreter.run(*flat)) for flat in probes]
        energy = sum(float(r.square().sum()) for r in references)
        result = []
        for layer, error in zip(layers, layer_errors):
            if error <= 0 or layer.node.target not in LAYER_OPS:
                result.append(None)
                continue
            interpreter.node, interpreter.weight_bias = layer.node, approximate(layer)
            moved = sum(float((_outputs(interpreter.run(*flat)) - ref).square().sum()) for flat, ref in zip(probes, references))
            interpreter.node = None
            result.append(moved / max(energy, 1e-300) / error)
    return result
