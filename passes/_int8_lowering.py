"""How an int8 GEMM node lowers: the candidate implementations, their fidelity contract, the static table.

Families (``fxcompress.tuning``) and their candidates — each candidate is a custom op (or the float
original) the pass can emit as one graph node:

* ``int8_linear_dynamic`` (per-token W8A8): ``float`` (the unrewritten ``aten.linear``/``conv2d``),
  ``int_mm`` (CPU: ``fxcompress::int8_linear`` = ``torch._int_mm`` + ATen quantize/dequantize),
  ``triton`` (CUDA: the same op, Triton kernels), ``qengine:<engine>`` (CPU:
  ``fxcompress::int8_linear_qengine``, PyTorch's FBGEMM/x86/oneDNN/QNNPACK prepacked dynamic linear,
  activations quantized per tensor);
* ``int8_linear_static`` (calibrated W8A8): ``float``, ``int_mm``, ``triton``;
* ``int8_weight_only`` (W8A16): ``float``, ``int8_weight_only`` (``fxcompress::int8_weight_only_linear``),
  ``int8_weight_only_bf16`` (CPU, float32 activations: ``fxcompress::int8_weight_only_linear_bf16``, the
  activations rounded to bf16 for ATen's int8-weight GEMM, within the contract where that rounding is).

Fidelity contract: a candidate may be chosen when its output error on the node's real input
(``‖y − y_float‖ / ‖y_float‖``) is at most ``error_factor`` × the error of the scheme the mode
documents (per-token or calibrated W8A8 as ``int_mm``/``triton`` compute it), so a per-tensor engine
cannot be picked where activation outliers make it much worse.

Static table (``tune=False``; CPU features from ``/proc/cpuinfo``):

| device / CPU feature | dynamic | static | weight_only |
|---|---|---|---|
| CUDA | triton | triton | int8_weight_only (Triton) |
| AVX512_VNNI, AVX_VNNI or AMX-INT8 | int_mm (oneDNN VNNI s8·s8) | int_mm | float (ATen int8-weight GEMMs lose to fp32/bf16 GEMMs) |
| AVX2 without VNNI | qengine:fbgemm (u8·s8 AVX2 kernels) | float (no fast s8·s8 path) | float |
| no AVX2 (e.g. ARM) | qengine:qnnpack if built, else float | float | float |
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.fx as fx

from fxcompress import ir, tuning
from fxcompress.ops import qengine
from fxcompress.ops.int8_conv import TRITON_ENGINE

fxops = torch.ops.fxcompress
FAMILIES = {"dynamic": "int8_linear_dynamic", "static": "int8_linear_static", "weight_only": "int8_weight_only"}
SCHEME = {"cpu": "int_mm", "cuda": "triton"}  # the candidate computing exactly what the mode documents


@dataclass
class GemmProblem:
    """One int8 GEMM node at its real shapes: the op input ``x``, the op's tensor arguments, the float original.

    ``op_args(extra)`` are the op's arguments after ``x`` (weights, scales, bias, activation);
    ``prepare``/``finish`` map the node's input to the op's input and back (identity for linears,
    NHWC permutes and SmoothQuant's ``x / σ`` otherwise); ``float_run`` computes the unrewritten nodes.
    """

    device: torch.device
    x: torch.Tensor
    op_args: tuple
    float_run: Callable[[], Any]
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    finish: Callable[[torch.Tensor], Any] = lambda y: y
    key: dict = field(default_factory=dict)


def nhwc_input(conv: bool, sigma: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A node's input -> its op's input: NHWC for a 1×1 conv, ``x / σ`` under SmoothQuant."""
    inverse = sigma.reciprocal() if sigma is not None else None

    def prepare(x):
        x = x.permute(0, 2, 3, 1) if conv else x
        return x * inverse.to(x.dtype) if inverse is not None else x

    return prepare


def nchw_output(conv: bool) -> Callable[[torch.Tensor], Any]:
    return (lambda y: y.permute(0, 3, 1, 2)) if conv else (lambda y: y)


@dataclass(frozen=True)
class OpCandidate(tuning.Candidate):
    """A candidate lowered to ``op(x, *problem.op_args, *extra_args)``; ``op=None`` keeps the float original."""

    op: Any = None
    extra_args: tuple = ()


def _op_candidate(name: str, op, extra_args: tuple = (), available=lambda p: True) -> OpCandidate:
    def run(problem: GemmProblem):
        return problem.finish(op(problem.prepare(problem.x), *problem.op_args, *extra_args))

    return OpCandidate(name=name, run=run, available=available, op=op, extra_args=extra_args)


def _on(device_type: str) -> Callable[[GemmProblem], bool]:
    return lambda problem: problem.device.type == device_type


def _float_candidate() -> OpCandidate:
    return OpCandidate(name="float", run=lambda problem: problem.float_run())


def _engine_available(engine: str) -> Callable[[GemmProblem], bool]:
    return lambda problem: problem.device.type == "cpu" and qengine.engine_available(engine)


def _has(*flags: str) -> bool:
    return bool(set(flags) & set(tuning.cpu_description()[1]))


def _dynamic_rule(problem: GemmProblem, names: list[str]) -> str:
    if problem.device.type == "cuda":
        preferred = ["triton"]
    elif _has("avx512_vnni", "avx_vnni", "amx_int8"):
        preferred = ["int_mm"]
    elif _has("avx2"):
        preferred = ["qengine:fbgemm", "qengine:x86"]
    else:
        preferred = ["qengine:qnnpack"]
    return next((n for n in preferred if n in names), "float")


def _static_rule(problem: GemmProblem, names: list[str]) -> str:
    fast = problem.device.type == "cuda" or _has("avx512_vnni", "avx_vnni", "amx_int8")
    scheme = SCHEME.get(problem.device.type, "float")
    return scheme if fast and scheme in names else "float"


def _weight_only_rule(problem: GemmProblem, names: list[str]) -> str:
    return "int8_weight_only" if problem.device.type == "cuda" and "int8_weight_only" in names else "float"


def _register() -> None:
    dynamic, static, weight_only = (tuning.family(FAMILIES[m], rule) for m, rule in
                                    (("dynamic", _dynamic_rule), ("static", _static_rule), ("weight_only", _weight_only_rule)))
    for fam in (dynamic, static, weight_only):
        tuning.register_candidate(fam.name, _float_candidate())
    for device, name in SCHEME.items():
        tuning.register_candidate(dynamic.name, _op_candidate(name, fxops.int8_linear.default, available=_on(device)))
        tuning.register_candidate(static.name, _op_candidate(name, fxops.int8_linear_static.default, available=_on(device)))
    for engine in qengine.QUANTIZED_ENGINES:
        tuning.register_candidate(dynamic.name, _op_candidate(
            f"qengine:{engine}", fxops.int8_linear_qengine.default, (engine,), available=_engine_available(engine)))
    tuning.register_candidate(weight_only.name, _op_candidate("int8_weight_only", fxops.int8_weight_only_linear.default))
    tuning.register_candidate(weight_only.name, _op_candidate(
        "int8_weight_only_bf16", fxops.int8_weight_only_linear_bf16.default,
        available=lambda problem: problem.device.type == "cpu" and problem.x.dtype == torch.float32))


_register()


def relative_error(output, reference) -> float:
    """``‖y − y_ref‖ / ‖y_ref‖``; a tuple ``reference`` (sibling linears) is compared as one concatenated GEMM."""
    if isinstance(reference, tuple):
        reference = torch.cat(reference, -1) if len(reference) > 1 else reference[0]
    output, reference = output.double(), reference.double()
    return ((output - reference).norm() / reference.norm().clamp(min=1e-30)).item()


@dataclass(frozen=True)
class Lowering:
    """The chosen candidate for one node (a GEMM or a conv), with everything the report shows about the choice."""

    candidate: tuning.Candidate
    choice: tuning.Choice
    errors: dict[str, float]
    rejected: dict[str, str]

    @property
    def impl(self) -> str:
        return self.candidate.name

    @property
    def engine(self) -> str | None:
        """The ``engine`` argument of the op node (``qengine:<engine>`` → ``engine``, ``triton``); ``None``: not an engine op."""
        if self.impl == TRITON_ENGINE:
            return TRITON_ENGINE
        return self.impl.split(":", 1)[1] if self.impl.startswith("qengine:") else None

    def detail(self) -> dict:
        return {
            "impl": self.impl,
            "chosen_by": self.choice.reason + (" (cached)" if self.choice.cached else ""),
            "timings": self.choice.timings_text() or "-",
            "output_rel_error": self.errors.get(self.impl),
            **({"rejected": "; ".join(f"{n}: {why}" for n, why in self.rejected.items())} if self.rejected else {}),
        }


def measured_choice(family_name: str, problem: Any, key: dict, *, scheme: str, scheme_error: Callable[[dict, Any], float],
                    as_float: Callable = lambda y: y, tune: bool, allow_slower: bool, impl: str | None,
                    error_factor: float, min_run_time: float, timed: Callable | None = None,
                    baseline: str = "float") -> Lowering:
    """The fidelity contract, then the measured choice, for one node of any int8 family.

    Every available candidate runs on the node's real input; one whose error against the float
    original exceeds ``error_factor`` × the ``scheme``'s own (``scheme_error(errors, reference)``) is
    rejected; ``impl`` / ``allow_slower`` narrow the rest, which are timed (or looked up) under ``key``
    (``timed``: what to time per candidate; ``baseline``: kept unless measurably beaten, :func:`tuning.choose`).
    """
    family = tuning.family(family_name)
    available = [c for c in family.candidates.values() if c.available(problem)]
    with torch.no_grad():
        reference = problem.float_run()
        errors = {c.name: relative_error(as_float(c.run(problem)), reference) for c in available if c.name != "float"}
        own_error = scheme_error(errors, reference)
    budget = max(error_factor * own_error, 1e-6)
    errors["float"] = 0.0
    rejected = {n: f"output error {e:.2g} > {error_factor:g}x the {scheme}'s {budget / error_factor:.2g}"
                for n, e in errors.items() if e > budget}
    names = [c.name for c in available if c.name not in rejected]
    if impl is not None:
        names = [n for n in names if n == impl]
    elif allow_slower:
        names = [n for n in names if n != "float"] or names
    if not names:
        reason = rejected.get(impl) or f"{impl!r} is not available here ({[c.name for c in available]})"
        return Lowering(family.candidates["float"], tuning.Choice("float", f"impl={impl!r}: {reason}"), errors, rejected)
    choice = tuning.choose(family.name, problem, names, {**key, "candidates": sorted(names)}, tune=tune,
                           min_run_time=min_run_time, timed=timed, baseline=baseline)
    return Lowering(family.candidates[choice.impl], choice, errors, rejected)


def choose_lowering(mode: str, problem: GemmProblem, *, tune: bool, allow_slower: bool, impl: str | None,
                    error_factor: float, min_run_time: float, timed: Callable | None = None,
                    baseline: str = "float") -> Lowering:
    """The measured choice for a GEMM; the budget is the error of the candidate computing the mode's scheme."""
    scheme = "int8_weight_only" if mode == "weight_only" else SCHEME.get(problem.device.type)
    return measured_choice(
        FAMILIES[mode], problem, {**problem.key, "mode": mode}, scheme=f"{mode} scheme",
        scheme_error=lambda errors, _: errors.get(scheme, min(errors.values(), default=0.0)),
        tune=tune, allow_slower=allow_slower, impl=impl, error_factor=error_factor, min_run_time=min_run_time, timed=timed,
        baseline=baseline)


@dataclass(frozen=True)
class RowBuckets:
    """A linear's engines by row count: ``decode`` chosen at one row, ``prefill`` at the example's rows.

    Different choices run as one ``fxcompress::int8_linear_by_rows`` node holding the int8 weight. Float at
    prefill runs ``s_w ⊙ W_q`` dequantized (``dequantize``: one extra pass over the weight, amortized over
    the rows); float at decode keeps the float weight too (dequantizing every step costs more than the GEMV).
    """

    decode: Lowering
    prefill: Lowering
    max_decode_rows: int

    @property
    def split(self) -> bool:
        return self.decode.candidate.name != self.prefill.candidate.name

    @property
    def needs_float_weight(self) -> bool:
        return self.split and self.decode.candidate.name == "float"

    def engines(self) -> tuple[str, str]:
        """(engine at ``M <= max_decode_rows``, engine above) as ``int8_linear_by_rows`` names them."""
        large = self.prefill.candidate.name
        return self.decode.candidate.name, "dequantize" if large == "float" and self.split else large

    def reason(self) -> str:
        small, large = self.engines()
        if not self.split:
            return f"{small} at every row count (measured at 1 row and at the example's)"
        why = "; float is fastest at prefill: it runs s_w*W_q dequantized, the weight is stored once in int8" if large == "dequantize" else ""
        if self.needs_float_weight:
            why += "; float is fastest at decode: the float weight is kept next to the int8 one"
        return f"int8_linear_by_rows: {small} at <= {self.max_decode_rows} rows, {large} above{why}"

    def detail(self) -> dict:
        small, large = self.engines()
        decode = self.decode.detail()
        return {
            **self.prefill.detail(), "impl": large, "decode_impl": small, "decode_chosen_by": decode["chosen_by"],
            "decode_timings": decode["timings"], "decode_output_rel_error": decode["output_rel_error"],
            "max_decode_rows": self.max_decode_rows, "row_dispatch": self.reason(),
        }


def decode_problem(problem: GemmProblem, float_group: "FloatGroup", working_set: int) -> tuple[GemmProblem, Callable]:
    """``problem`` at one row (a decoding step: the example's first row, the float original run on it)
    and what to time for it: the weights cold, as the step reads them (:func:`cold_weight_calls`)."""
    k = problem.x.shape[-1]
    x = problem.x.reshape(-1, k)[:1].reshape((1,) * (problem.x.dim() - 1) + (k,))
    at_one_row = replace(problem, x=x, float_run=float_group.at(x), key={**problem.key, "x": list(x.shape), **cold_key(working_set)})
    return at_one_row, cold_weight_calls(at_one_row, gemm_weight_copies(at_one_row, float_group), working_set)


_INPUT = object()  # where the group's input goes in a bound call


@dataclass(frozen=True)
class FloatGroup:
    """The unrewritten nodes of a GEMM group (and the activation fused after it) with their tensors bound
    to the graph's values now, before rewrites rename the inputs: the ``float`` candidate at any input."""

    calls: tuple  # (target, args, kwargs) per node, the input replaced by _INPUT
    activation: Callable

    @classmethod
    def bind(cls, gm: fx.GraphModule, group: list[fx.Node], args: list[dict], values: dict, fused: tuple[str, fx.Node]):
        x_node = args[0]["input"]

        def value(arg):
            if isinstance(arg, fx.Node):
                return ir.get_attr(gm, arg.target) if arg.op == "get_attr" else (_INPUT if arg is x_node else values[arg.name])
            return arg

        calls = tuple((node.target, [value(a) for a in node.args], {k: value(v) for k, v in node.kwargs.items()}) for node in group)
        name, user = fused
        activation = (lambda y: user.target(y, *user.args[1:], **user.kwargs)) if name != "none" else (lambda y: y)
        return cls(calls, activation)

    def at(self, x: torch.Tensor) -> Callable[[], tuple]:
        bound = [(target, [x if a is _INPUT else a for a in args], {k: x if v is _INPUT else v for k, v in kwargs.items()})
                 for target, args, kwargs in self.calls]
        return lambda: tuple(self.activation(target(*a, **k)) for target, a, k in bound)

    def tensors(self) -> list[torch.Tensor]:
        return [a for _, args, kwargs in self.calls for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]

    def with_copied_tensors(self) -> "FloatGroup":
        def copied(a):
            return a.clone() if isinstance(a, torch.Tensor) else a

        return FloatGroup(tuple((t, [copied(a) for a in args], {k: copied(v) for k, v in kwargs.items()})
                                for t, args, kwargs in self.calls), self.activation)


DECODE_WORKING_SET_CAP = 256 << 20
"""Most bytes one cycle of cold-weight copies reads (memory: every candidate holds its copies at once)."""


def cold_key(working_set: int) -> dict:
    """The timing-cache key part of cold-weight timings: the working set's power-of-two MiB bucket."""
    return {"cold_weights_mib": 2 ** round(math.log2(max(working_set, 1 << 20) / (1 << 20)))}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def decode_working_set(gm: fx.GraphModule) -> int:
    """The bytes one decoding step reads between two calls of the same layer, as the int8 model will
    hold them: every matrix (GEMM, expert and embedding weights) at one byte per element, vectors (norms,
    biases) as stored; capped at :data:`DECODE_WORKING_SET_CAP`."""
    tensors = dict(gm.named_parameters(remove_duplicate=True)) | dict(gm.named_buffers(remove_duplicate=True))
    total = sum(t.numel() if t.dim() >= 2 else t.numel() * t.element_size() for t in tensors.values())
    return min(total, DECODE_WORKING_SET_CAP)


def gemm_weight_copies(problem: GemmProblem, float_group: FloatGroup) -> Callable[[tuning.Candidate], tuple[Callable, int]]:
    """candidate -> (a copy of ``problem`` with fresh copies of the weights it reads, the bytes one call reads)."""
    def copies(candidate: tuning.Candidate) -> tuple[Callable, int]:
        if candidate.name == "float":
            return (lambda: replace(problem, float_run=float_group.with_copied_tensors().at(problem.x))), tensor_bytes(float_group.tensors())
        return (lambda: replace(problem, op_args=tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in problem.op_args))), \
            tensor_bytes(problem.op_args)

    return copies


def cold_weight_calls(problem: Any, copies: Callable[[tuning.Candidate], tuple[Callable, int]], working_set: int) -> Callable:
    """What is timed for each candidate of a decode problem: every call reads the next of enough copies
    of the candidate's weights (``copies``: how to make one, and its bytes) that one cycle reads
    ``working_set`` bytes.

    A decoding step streams the whole model once, so between two calls of one layer the caches have seen
    every other weight: the layer's weights arrive cold. A GEMV timed on one hot copy measures the cache
    instead and favours fp32 (2-core Xeon VM, 1024x1024 at one row: fp32 0.10 ms hot vs 0.35 ms cold,
    FBGEMM int8 0.14 vs 0.18 ms; ``bench/bench_decode_gemv.py``)."""

    def timed(candidate: tuning.Candidate) -> Callable:
        copy, nbytes = copies(candidate)
        count = max(1, min(4096, math.ceil(working_set / max(nbytes, 1))))
        calls = [functools.partial(candidate.run, problem)] + [functools.partial(candidate.run, copy()) for _ in range(count - 1)]
        with torch.no_grad():
            for call in calls:  # each copy packs its engine weight on first use: not timed
                call()
        cycle = itertools.cycle(calls)
        return lambda: next(cycle)()

    return timed


def insert_call(gm: fx.GraphModule, target, args: tuple, origin: fx.Node) -> fx.Node:
    """Insert ``target(*args)`` with ``origin``'s module stack and a fake value computed from its inputs."""
    new = gm.graph.call_function(target, args)
    new.meta["nn_module_stack"] = origin.meta.get("nn_module_stack", {})
    new.meta["val"] = ir.fake_value(target, args)
    return new


def stacked_weights(weights: list[torch.Tensor]) -> torch.Tensor:
    """A GEMM group's float weights as one matrix; a single weight is shared with the graph, not copied."""
    return weights[0].detach() if len(weights) == 1 else torch.cat(weights)
