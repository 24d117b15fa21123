"""Never slower for int8 convs: each int8 region, and then the whole model, must measure faster than float.

The per-conv engine choice (``_int8_conv``) sees one conv and its own boundary; what it cannot see is
the rest of a region: a float neighbour's layout conversions, many small islands whose quantize and
dequantize add up (EfficientNet's SiLU after every conv), or engine overheads that only show at scale.
So, after it:

1. **Regions.** The chosen convs are rewritten into a trial copy of the graph. Every connected int8
   region (entry quantizes, int8 ops, exit dequantizes) is cut out as a ``GraphModule``
   (``torch.fx.passes.utils.fuser_utils.fuse_as_graphmodule``), and so are the float nodes it
   replaces; the two are timed interleaved on the region's real inputs (family ``int8_conv_region``
   of ``fxcompress.tuning``: ``compare``, the per-machine cache, float kept unless int8 is measurably
   faster). A region that loses goes back to float as a whole, with the timings as its reason.
   Regions are independent (they touch only through float tensors), so dropping one changes no other.
   A single region (a ResNet) is left to step 2, which then measures exactly it.
2. **Whole model.** The graph with the surviving regions is timed against the graph before the
   rewrite (family ``int8_conv_model``); if it is not measurably faster, every conv stays float.

Both steps need measurement: they run when ``tune=True`` and neither ``impl=`` nor ``allow_slower=``
forces the lowering (the static rule, ``tune=False``, does not time anything).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

from fxcompress import ir, tuning
from fxcompress.verify import node_values

from ._int8_conv_rewrite import ConvLowerer, Region

REGION_FAMILY, MODEL_FAMILY = "int8_conv_region", "int8_conv_model"
INT8 = {REGION_FAMILY: "int8_region", MODEL_FAMILY: "int8_model"}  # the int8 candidate of each family


@dataclass
class FloatOrInt8:
    """Two implementations of the same computation at its real inputs: the float original and int8."""

    device: torch.device
    float_run: Callable[[], Any]
    int8_run: Callable[[], Any]


for _family in (REGION_FAMILY, MODEL_FAMILY):
    tuning.family(_family)
    tuning.register_candidate(_family, tuning.Candidate("float", run=lambda p: p.float_run()))
    tuning.register_candidate(_family, tuning.Candidate(INT8[_family], run=lambda p: p.int8_run()))


def _digest(*texts: str) -> str:
    return hashlib.sha1("\n".join(texts).encode()).hexdigest()


def _shapes(values: list) -> list:
    return [list(v.shape) if isinstance(v, torch.Tensor) else repr(v) for v in values]


def _reachable(start: set[fx.Node], step: Callable[[fx.Node], Any]) -> set[fx.Node]:
    seen, todo = set(), list(start)
    while todo:
        for other in step(todo.pop()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def _cut(gm: fx.GraphModule, names: set[str]) -> tuple[fx.GraphModule, tuple[fx.Node, ...]]:
    """The nodes ``names`` of ``gm`` as a ``GraphModule`` of their outside inputs, and those inputs.

    Float ops on a path that leaves the nodes and comes back (a conv kept float between two int8 convs of
    one residual block) are part of the region's cost in both versions, so they are cut out with it."""
    nodes = {n for n in gm.graph.nodes if n.name in names}
    enclosed = _reachable(nodes, lambda n: n.users) & _reachable(nodes, lambda n: n.all_input_nodes)
    members = nodes | enclosed
    sub, inputs, _ = fuse_as_graphmodule(gm, [n for n in gm.graph.nodes if n in members], "Int8ConvRegion",
                                         always_return_tuple=True)
    return sub, inputs


def _input_values(gm: fx.GraphModule, inputs: tuple[fx.Node, ...], values: dict[str, torch.Tensor]) -> list:
    return [ir.get_attr(gm, n.target) if n.op == "get_attr" else values[n.name] for n in inputs]


def _choose(family: str, float_fn, int8_fn, device: torch.device, key: dict, config) -> tuning.Choice:
    problem = FloatOrInt8(device, float_fn, int8_fn)
    return tuning.choose(family, problem, ["float", INT8[family]], key, tune=True, min_run_time=config.tune_time_s)


def keep_faster_regions(lowerer: ConvLowerer, chosen: set[str]) -> tuple[set[str], dict[str, tuple[str, str]]]:
    """Step 1: the chosen convs minus those in regions that did not measure faster than float, and per
    region (by its conv nodes) its layers and the decision."""
    gm, config = lowerer.gm, lowerer.config
    trial = copy.deepcopy(gm)
    regions = lowerer.rewrite(trial, chosen)
    if len(regions) == 1:  # the model with it differs from the model without it by this region alone
        region = regions[0]
        return chosen, {region.label: (_layers(lowerer, region), "int8: the only region, decided by the whole-model measurement")}
    cuts = []
    for region in regions:
        float_gm, float_inputs = _cut(gm, set(region.float_nodes))
        int8_gm, int8_inputs = _cut(trial, set(region.int8_nodes))
        cuts.append((region, float_gm, float_inputs, int8_gm, int8_inputs))
    wanted = {n.name for *_, fi, _, ii in cuts for n in (*fi, *ii) if n.op != "get_attr"}
    values = node_values(gm, lowerer.ctx.args, lowerer.ctx.kwargs, wanted)
    decisions = {}
    for region, float_gm, float_inputs, int8_gm, int8_inputs in cuts:
        float_args, int8_args = _input_values(gm, float_inputs, values), _input_values(trial, int8_inputs, values)
        key = {"region": _digest(float_gm.code, int8_gm.code), "inputs": _shapes(float_args)}
        device = next((v.device for v in float_args if isinstance(v, torch.Tensor)), torch.device("cpu"))
        choice = _choose(REGION_FAMILY, functools.partial(float_gm, *float_args), functools.partial(int8_gm, *int8_args),
                         device, key, config)
        verdict = _verdict(choice, f"region of {len(region.convs)} conv(s) measured as a whole (entry quantize to exit dequantize)")
        decisions[region.label] = (_layers(lowerer, region), verdict)
        if choice.impl == "float":
            lowerer.keep_float(region.convs, verdict)
            chosen = chosen - set(region.convs)
    return chosen, decisions


def keep_if_model_faster(lowerer: ConvLowerer, chosen: set[str]) -> tuple[set[str], str]:
    """Step 2: ``chosen`` if the whole rewritten model measures faster than before, else nothing."""
    gm, ctx = lowerer.gm, lowerer.ctx
    baseline, trial = copy.deepcopy(gm), copy.deepcopy(gm)
    lowerer.rewrite(trial, chosen)
    ir.finalize(trial)
    baseline.recompile()
    key = {"model": _digest(baseline.code, trial.code), "inputs": _shapes([*ctx.args, *ctx.kwargs.values()])}
    device = next((t.device for t in ctx.tensors()), torch.device("cpu"))
    choice = _choose(MODEL_FAMILY, functools.partial(ctx.run, baseline), functools.partial(ctx.run, trial), device, key,
                     lowerer.config)
    verdict = _verdict(choice, "the whole model with its int8 regions")
    if choice.impl == "float":
        lowerer.keep_float(sorted(chosen), verdict)
        return set(), verdict
    return chosen, verdict


def _layers(lowerer: ConvLowerer, region: Region) -> str:
    return ", ".join(lowerer.details[c]["layer"] for c in region.convs)


def _verdict(choice: tuning.Choice, what: str) -> str:
    winner = "float" if choice.impl == "float" else "int8"
    return f"{winner}: {what}, {choice.reason}{' (cached)' if choice.cached else ''} ({choice.timings_text()})"


def lower_convs(gm: fx.GraphModule, ctx, config, scales: dict, result) -> None:
    """Rewrite the static int8 convs of ``gm``; per-conv rows, the region map and the whole-model
    decision go to ``result.details``."""
    lowerer = ConvLowerer(gm, ctx, config, scales, result)
    chosen = lowerer.choose()
    decisions, model_verdict = {}, None
    if chosen and config.tune and config.impl is None and not config.allow_slower:
        chosen, decisions = keep_faster_regions(lowerer, chosen)
        if chosen:
            chosen, model_verdict = keep_if_model_faster(lowerer, chosen)
    regions: list[Region] = lowerer.rewrite(gm, chosen) if chosen else []
    for region in regions:
        result.rewritten.extend(lowerer.details[c]["layer"] for c in region.convs)
        region.row["decision"] = decisions.get(region.label, ("", "not measured (tune=False, impl= or allow_slower=)"))[1]
    result.details.extend(lowerer.details.values())
    result.details.extend(region.row for region in regions)
    result.details.extend({"region": "kept float", "layers": layers, "decision": verdict}
                          for layers, verdict in decisions.values() if not verdict.startswith("int8"))
    if model_verdict is not None:
        result.details.append({"region": "whole model", "decision": model_verdict})
