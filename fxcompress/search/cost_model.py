"""The cost model: latency per graph node measured on this machine, size and MACs counted.

A graph's predicted latency is the sum of its call nodes' latencies, each node timed on its own at
the values it really receives (recorded by one interpreted run on the example inputs), times one
correction factor: the measured end-to-end latency of the base graph over its sum (what the graph's
own Python dispatch and memory traffic between nodes add). A node is identified by its operator and
the shapes, dtypes, layouts and non-tensor arguments of its inputs, so every option graph shares the
timings of the nodes it did not change and only its rewritten nodes are new. Node timings are
interleaved in one :func:`fxcompress.tuning.compare` call, with the whole base graph among them (load
from other processes hits all of them alike; timings taken at different times under different load
would not be comparable), and cached per machine as one set (:class:`fxcompress.tuning.TimingCache`).
MACs and weight bytes are counted exactly (``FlopCounterMode``, tensor sizes).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx._pytree import tree_flatten_spec

from .. import tuning
from ..ir import module_path
from ..report import count_flops, weight_bytes

FAMILY = "graph_node_latency"
REFERENCE = "<graph>"


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ["T", list(value.shape), str(value.dtype), value.is_contiguous(), value.is_contiguous(memory_format=torch.channels_last)
                if value.dim() == 4 else False]
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, float | int | bool | str) or value is None:
        return value
    return type(value).__name__ if not isinstance(value, torch.dtype | torch.device | torch.memory_format) else str(value)


def node_key(node: fx.Node, args: tuple, kwargs: dict) -> str:
    """What a node's latency depends on: the operator and the description of its inputs."""
    target = node.target
    name = str(target) if isinstance(target, str | torch._ops.OpOverload) else getattr(target, "__qualname__", str(target))
    return json.dumps([node.op, name, _describe(args), _describe(kwargs)], default=str)


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps, per call node, its key and a thunk that re-runs it on the same values."""

    def __init__(self, gm: fx.GraphModule, known: Callable[[str], bool]):
        super().__init__(gm)
        self.known = known
        self.keys: list[str] = []
        self.nodes: list[tuple[str, str, str]] = []  # name, operator, module path
        self.thunks: dict[str, Callable[[], Any]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        key = node_key(n, args, kwargs)
        self.keys.append(key)
        self.nodes.append((n.name, str(n.target), module_path(n)))
        if not self.known(key) and key not in self.thunks:
            self.thunks[key] = functools.partial(getattr(self, n.op), n.target, args, kwargs)
        return getattr(self, n.op)(n.target, args, kwargs)


@dataclass
class GraphProfile:
    """One graph's call nodes: their keys (for :meth:`CostModel.predict_ms`) and, in the same order, their
    names, operators and the user modules they came from (for :mod:`.compose`, which matches them to the base graph's)."""

    keys: list[str]
    nodes: list[tuple[str, str, str]] = field(default_factory=list)
    weight_bytes: int = 0
    macs: int = 0


Clock = Callable[[dict[str, Callable[[], Any]]], dict[str, tuning.Timing]]
"""Times callables side by side: :func:`measured_clock` on the machine; tests inject a deterministic one."""


def measured_clock(device: torch.device = torch.device("cpu"), min_run_time: float = 0.02, rounds: int = 5,
                   warmup: int = 1) -> Clock:
    """:func:`fxcompress.tuning.compare` after ``warmup`` extra calls of each callable (first calls of a
    kernel at a new shape pay for its set-up, which compare's own one warm-up call does not always
    absorb). The defaults are for the cost model's nodes: hundreds of callables, so short blocks and
    few rounds (a node costs ~8 calls); its error is corrected end to end by the correction rounds."""

    def clock(fns: dict[str, Callable[[], Any]]) -> dict[str, tuning.Timing]:
        with torch.no_grad():
            for fn in fns.values():
                for _ in range(warmup):
                    fn()
        return tuning.compare(fns, device, min_run_time, rounds)

    return clock


@dataclass
class CostModel:
    """Per-node latencies of this machine (measured on demand, cached) and the end-to-end correction."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    clock: Clock | None = None
    correction: float = 1.0
    timings: dict[str, float] = field(default_factory=dict)
    _pending: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def _known(self, key: str) -> bool:
        return key in self.timings or key in self._pending

    def profile(self, gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[GraphProfile, Any]:
        """Record ``gm``'s nodes on these inputs (and return its outputs on them, which the error
        measurement can reuse); nodes not seen before are timed by the next :meth:`measure`."""
        recorder = _Recorder(gm, self._known)
        flat = tree_flatten_spec((args, kwargs), gm._in_spec) if getattr(gm, "_in_spec", None) else list(args)
        with torch.no_grad():
            outputs = recorder.run(*flat)
        self._pending.update(recorder.thunks)
        return GraphProfile(recorder.keys, recorder.nodes), outputs

    def measure(self, reference: Callable[[], Any] | None = None, reference_profile: GraphProfile | None = None) -> int:
        """Time every node recorded but not yet timed, interleaved in one run, and with them the whole
        ``reference`` graph (its end-to-end time over its node sum is the correction). Timings measured
        together are cached together, per machine, under the set of nodes: a later search on the same
        model and machine reuses them as one consistent set. Returns how many nodes were timed."""
        if not self._pending:
            return 0
        names = sorted(self._pending)
        cache = tuning.TimingCache.default()
        entry = json.dumps({"machine": tuning.machine_key(self.device), "family": FAMILY, "nodes": names}, sort_keys=True)
        timings = cache.get(entry, [*names, REFERENCE] if reference is not None else names)
        if timings is None:
            fns = dict(self._pending)
            if reference is not None:
                fns[REFERENCE] = reference
            timings = (self.clock or measured_clock(self.device))(fns)
            if self.clock is None:
                cache.put(entry, timings)
        self.timings.update({k: timings[k].median_ms for k in names})
        if reference is not None and reference_profile is not None:
            self.calibrate(reference_profile, timings[REFERENCE].median_ms)
        self._pending = {}
        return len(names)

    def node_sum_ms(self, profile: GraphProfile) -> float:
        return sum(self.timings[k] for k in profile.keys)

    def predict_ms(self, profile: GraphProfile) -> float:
        """Predicted end-to-end latency: the node sum times the correction."""
        return self.correction * self.node_sum_ms(profile)

    def calibrate(self, base: GraphProfile, measured_ms: float) -> None:
        """Set the correction so the base graph's prediction equals its end-to-end measurement."""
        total = self.node_sum_ms(base)
        self.correction = measured_ms / total if total > 0 else 1.0


def static_costs(gm: fx.GraphModule, ctx: Any, profile: GraphProfile, macs: bool = True) -> GraphProfile:
    """Fill in the counted (not timed) costs: weight bytes and (unless ``macs=False``: a forward saved)
    the MACs of one forward on the example inputs."""
    profile.weight_bytes = weight_bytes(gm)
    profile.macs = count_flops(gm, ctx) // 2 if macs else 0
    return profile

