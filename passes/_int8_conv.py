"""Static int8 convolutions for the ``int8`` pass: fused chains, int8 regions, measured engine choice.

A *chain* is what one ``fxcompress::int8_conv`` node computes (BN already folded by ``fold_bn``)::

    conv                      conv → relu | hardtanh(0, t)      (t: ReLU6 is exact by saturation)
    conv → add(·, r)          conv → add(·, r) → relu | hardtanh(0, t)

with the residual ``r`` an int8 value itself. Chains are planned in one topological sweep: a conv
whose only user is an activation or an add waits for it; an add is fused into its operand-0 conv
(else operand 1) when the other operand is int8 by then (a conv still waiting on that add becomes a
chain of its own). ``max_pool`` of an int8 value stays int8 (``max`` commutes with a monotone map).

*Regions*: chain outputs are ``uint8`` values with calibrated ``(s, z)``; a chain reading one takes
it as is, so ``quantize_u8`` sits only where a float tensor enters and ``dequantize_u8`` only where a
float op reads an int8 value. The ``(s, z)`` of a value: the ``"<layer>:out"`` range of its chain
(``z = 0, s = r/255`` after relu/hardtanh, else ``z = 128, s = r/127``; 7-bit, ``r/127`` and ``z = 64, s = r/63``,
where the CPU's engines saturate at full range: :func:`fxcompress.ops.int8_conv.saturates_full_range`), the ``"<layer>"`` input range
at a region entry, ``"<layer>:conv"`` for the pre-add output where an engine adds in a second op;
``fxcompress.calibrate`` measures them all on a BN-folded copy of the model (:func:`calibration_sites`).

*Engine choice*: per conv, ``float``, ``qengine:<x86|fbgemm|onednn>`` (CPU) and ``triton`` (CUDA: the
Triton implicit-GEMM conv; ``int8_conv_static`` family of ``fxcompress.tuning``) are timed at the
conv's real shapes, int8 from and to int8 inside a region, with the quantize/dequantize where the conv sits at a region boundary (planned with every
eligible conv int8, e.g. each conv between two SiLUs is an island); a candidate whose output error exceeds ``error_factor`` × the error of the
scheme simulated in float is rejected. Float wins → the conv stays ATen and ends a region. Each
region, and then the whole model, is measured against float afterwards (``_int8_conv_regions``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from fxcompress import ir, tuning
from fxcompress.ops.int8_conv import CONV_ENGINES, FUSED_ADD_ENGINES, TRITON_ENGINE, activation_quant_max, conv_engine_available
from fxcompress.ops.int8_linear import quantize_weight_per_channel

from ._int8_lowering import Lowering, measured_choice, relative_error

aten = torch.ops.aten
fxops = torch.ops.fxcompress
FAMILY = "int8_conv_static"
CONV_OPS = {aten.conv1d.default: 3, aten.conv2d.default: 4}  # op -> input rank
RELUS = {aten.relu.default, aten.relu_.default}
HARDTANHS = {aten.hardtanh.default, aten.hardtanh_.default}
ADDS = {aten.add.Tensor, aten.add_.Tensor}
MAX_POOLS = {aten.max_pool2d.default}
BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def layer_name(node: fx.Node) -> str:
    return ir.module_path(node) or node.name


# --- which convs, and the chains they head ------------------------------------------------------------

def conv_problem(gm: fx.GraphModule, node: fx.Node) -> str:
    """Why ``node`` cannot become a static int8 conv ("" if it can)."""
    args = ir.call_arguments(node)
    weight, bias = args["weight"], args["bias"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "the weight is computed, not a parameter"
    if ir.get_attr(gm, weight.target).dtype != torch.float32:
        return "the weight is not fp32"
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return "the bias is computed, not a parameter"
    shape, val = ir.fake_shape(args["input"]), args["input"].meta.get("val")
    if shape is None or len(shape) != CONV_OPS[node.target]:
        return "unbatched input: int8 convs take batched [N, C, ...] inputs"
    if val.dtype != torch.float32:
        return f"{val.dtype} activations: static int8 convs take fp32"
    if any(u.target in BATCH_NORMS for u in node.users):
        return "a BatchNorm follows: run fold_bn before int8 (the default pipeline does)"
    return ""


@dataclass
class Chain:
    conv: fx.Node
    add: fx.Node | None = None
    residual: fx.Node | None = None
    activation: fx.Node | None = None

    @property
    def end(self) -> fx.Node:
        return self.activation or self.add or self.conv

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv, self.add, self.activation) if n is not None]

    @property
    def clip(self) -> float | None:
        """The activation's upper bound (hardtanh), ``inf`` for relu, ``None`` without activation."""
        if self.activation is None:
            return None
        return float(self.activation.args[2]) if self.activation.target in HARDTANHS else float("inf")

    def fused(self) -> str:
        clip = self.clip
        act = "" if clip is None else "relu" if clip == float("inf") else f"hardtanh(0,{clip:g})"
        return "+".join(p for p in ("add" if self.add is not None else "", act) if p) or "none"


def _fusable_activation(node: fx.Node) -> fx.Node | None:
    """The sole user of ``node`` when it is relu or hardtanh(0, t ≥ 0)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.args[0] is not node:
        return None
    if user.target in RELUS:
        return user
    if user.target in HARDTANHS:
        args = ir.call_arguments(user)
        return user if float(args["min_val"]) == 0.0 and float(args["max_val"]) >= 0.0 else None
    return None


def _plain_add(node: fx.Node) -> bool:
    if node.target not in ADDS or len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return False
    a, b = (ir.fake_shape(x) for x in node.args[:2])
    return a is not None and a == b and ir.call_arguments(node).get("alpha", 1) == 1


def plan_chains(gm: fx.GraphModule, convs: set[fx.Node], can_add: Callable[[fx.Node], bool] = lambda c: True):
    """(chains by end node, the int8 max-pools) for the int8 ``convs`` (see the module docstring)."""
    chains: dict[fx.Node, Chain] = {}
    int8_values: set[fx.Node] = set()
    waiting: dict[fx.Node, list[fx.Node]] = {}  # add -> convs waiting on it
    pools: list[fx.Node] = []

    def close(chain: Chain) -> None:
        chains[chain.end] = chain
        int8_values.add(chain.end)

    for node in gm.graph.nodes:
        if node in convs:
            user = next(iter(node.users)) if len(node.users) == 1 else None
            if _fusable_activation(node) is not None:
                close(Chain(node, activation=_fusable_activation(node)))
            elif user is not None and _plain_add(user) and can_add(node):
                waiting.setdefault(user, []).append(node)
            else:
                close(Chain(node))
        elif node in waiting:
            candidates = waiting.pop(node)
            operands = list(node.args[:2])
            for index in (0, 1):
                conv, other = operands[index], operands[1 - index]
                if conv not in candidates:
                    continue
                if other in candidates:  # the other conv waits on this add too: it becomes a chain of its own
                    candidates.remove(other)
                    close(Chain(other))
                if other in int8_values:
                    candidates.remove(conv)
                    close(Chain(conv, add=node, residual=other, activation=_fusable_activation(node)))
                    break
            for conv in candidates:
                close(Chain(conv))
        elif node.target in MAX_POOLS and node.args[0] in int8_values:
            pools.append(node)
            int8_values.add(node)
    return chains, pools


def calibration_sites(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Every range the int8 conv lowering may need, by site name (``layer``, ``layer:out``, ``layer:conv``)."""
    convs = {n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS and not conv_problem(gm, n)}
    chains, _ = plan_chains(gm, convs)
    sites = {}
    for chain in chains.values():
        name = layer_name(chain.conv)
        sites[name] = ir.call_arguments(chain.conv)["input"]
        sites[f"{name}:out"] = chain.end
        if chain.add is not None:
            sites[f"{name}:conv"] = chain.conv
    return sites


# --- quantization parameters -----------------------------------------------------------------------------

NONNEGATIVE_OPS = RELUS | {aten.sigmoid.default, aten.softmax.int, aten.abs.default}


def is_nonnegative(node: Any) -> bool:
    """Nonnegative by construction (relu-like producers, pools of those); decides ``z = 0`` vs ``z = 128``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in NONNEGATIVE_OPS:
        return True
    if node.target in HARDTANHS:
        return float(ir.call_arguments(node)["min_val"]) >= 0.0
    if node.target in MAX_POOLS | {aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default}:
        return is_nonnegative(node.args[0])
    return False


def qparams(absmax_scale: float, nonnegative: bool, clip: float | None = None) -> tuple[float, int]:
    """``(s, z)`` of a uint8 value from a symmetric calibrated scale ``r/127``, on the grid ``0..top``:
    ``top`` is 255, or 127 where this CPU's engines saturate at full range (see ``activation_quant_max``)."""
    r = absmax_scale * 127.0
    top = grid_top()
    if nonnegative:
        r = min(r, clip) if clip is not None else r
        return max(r, 1e-8) / top, 0
    half = (top + 1) // 2
    return max(r, 1e-8) / (half - 1), half


def grid_top() -> int:
    """The top of the uint8 activation grid on this machine: every int8 value is capped there (see ``qparams``)."""
    return activation_quant_max(CONV_ENGINES)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, symmetric: ``W ≈ s_w[n] · W_q[n]`` (the same rule as the GEMM lowering)."""
    q, scale = quantize_weight_per_channel(weight.reshape(weight.shape[0], -1))
    return q.reshape(weight.shape), scale


# --- candidates and the measured choice ------------------------------------------------------------------

@dataclass
class Residual:
    """The int8 residual a chain adds before its activation: the uint8 value, its ``(s, z)`` and the
    ``(s, z)`` of the pre-add conv output (engines without a fused add requantize there, then add)."""

    q: torch.Tensor
    qparams: tuple[float, int]
    mid_qparams: tuple[float, int]


@dataclass
class ConvProblem:
    """One conv (+ residual add, + activation) at its real input: the uint8 input, the op's arguments, the float original."""

    device: torch.device
    x: torch.Tensor  # the float input (example value)
    x_q: torch.Tensor
    x_qparams: tuple[float, int]
    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    geometry: tuple  # stride, padding, dilation, groups
    out_qparams: tuple[float, int]
    relu: bool
    float_run: Callable[[], torch.Tensor]
    key: dict = field(default_factory=dict)
    enters_float: bool = False  # the region boundary is here: the candidate pays the quantize ...
    exits_float: bool = False  # ... and the dequantize
    residual: Residual | None = None  # the chain's fused add: each engine is timed with its own add

    def int8(self, engine: str) -> torch.Tensor:
        stride, padding, dilation, groups = self.geometry
        x_q = fxops.quantize_u8(self.x, *self.x_qparams, grid_top()) if self.enters_float else self.x_q
        add = (None, 1.0, 0, 1.0, 0) if self.residual is None else (self.residual.q, *self.residual.qparams, *self.residual.mid_qparams)
        y = fxops.int8_conv(x_q, *self.x_qparams, self.weight_q, self.weight_scale, self.bias,
                            stride, padding, dilation, groups, *self.out_qparams, self.relu, engine, *add, grid_top())
        return fxops.dequantize_u8(y, *self.out_qparams) if self.exits_float else y

    def as_float(self, y: torch.Tensor) -> torch.Tensor:
        return fxops.dequantize_u8(y, *self.out_qparams) if y.dtype == torch.uint8 else y

    def simulated(self) -> torch.Tensor:
        """The scheme in float: fake-quantized input and weight, the conv, the output's quantization."""
        (s_x, z_x), (s_o, z_o) = self.x_qparams, self.out_qparams
        x = (self.x_q.float() - z_x) * s_x
        w = self.weight_q.float() * self.weight_scale.view(-1, *[1] * (self.weight_q.dim() - 1))
        stride, padding, dilation, groups = self.geometry
        conv = torch.nn.functional.conv2d if x.dim() == 4 else torch.nn.functional.conv1d
        y = conv(x, w, self.bias, stride, padding, dilation, groups)
        if self.residual is not None:
            s_r, z_r = self.residual.qparams
            y = y + (self.residual.q.float() - z_r) * s_r
        y = y.relu() if self.relu else y
        return (torch.clamp(torch.round(y / s_o) + z_o, 0, grid_top()) - z_o) * s_o


def _engine_candidate(engine: str) -> tuning.Candidate:
    return tuning.Candidate(f"qengine:{engine}", run=lambda p: p.int8(engine),
                            available=lambda p: p.device.type == "cpu" and conv_engine_available(engine))


def _triton_available(problem: ConvProblem) -> bool:
    return problem.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _static_rule(problem: ConvProblem, names: list[str]) -> str:
    """``tune=False``: CUDA → the Triton conv; a CPU with AVX2/AVX-512 → the x86 engine (FBGEMM u8·s8
    kernels on AVX2, oneDNN VNNI where present); else float."""
    if problem.device.type == "cuda":
        return TRITON_ENGINE if TRITON_ENGINE in names else "float"
    if problem.device.type == "cpu" and set(tuning.cpu_description()[1]) & {"avx2", "avx512f"}:
        return next((n for n in ("qengine:x86", "qengine:fbgemm", "qengine:onednn") if n in names), "float")
    return "float"


def _register() -> None:
    tuning.family(FAMILY, _static_rule)
    tuning.register_candidate(FAMILY, tuning.Candidate("float", run=lambda p: p.float_run()))
    for engine in CONV_ENGINES:
        tuning.register_candidate(FAMILY, _engine_candidate(engine))
    tuning.register_candidate(FAMILY, tuning.Candidate(TRITON_ENGINE, run=lambda p: p.int8(TRITON_ENGINE),
                                                       available=_triton_available))


_register()


def choose_conv_lowering(problem: ConvProblem, *, tune: bool, allow_slower: bool, impl: str | None,
                         error_factor: float, min_run_time: float) -> Lowering:
    """The measured choice for a conv; the budget is the error of the scheme simulated in float.
    An ``impl`` that names no conv candidate (a GEMM's) does not apply to convs."""
    return measured_choice(
        FAMILY, problem, problem.key, scheme="scheme",
        scheme_error=lambda _, reference: relative_error(problem.simulated(), reference), as_float=problem.as_float,
        impl=impl if impl in tuning.family(FAMILY).candidates else None,
        tune=tune, allow_slower=allow_slower, error_factor=error_factor, min_run_time=min_run_time)
