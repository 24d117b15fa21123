"""Dynamic shapes: which input dims stay symbolic, what export specialized and why, the same
inputs resized to a second shape for verification, and shape-guard failures explained.

Capture marks every dim of every input tensor ``Dim.AUTO``; export keeps a dim symbolic unless
the model's code fixes it. Everything here reads what export recorded: the graph placeholders'
fake tensors (symbolic sizes), their ``ShapeEnv`` (symbol ranges, the symbols it replaced by
constants, and the guard — with source location — that forced each replacement).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.export import Dim
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from .errors import InputShapeError

# why a static dim is static (DimShape.kind)
PINNED, SIZE_ONE, MODEL, EXPORT = "pinned", "size_one", "model", "export"


@dataclass(frozen=True)
class DimShape:
    size: int  # in the example the graph is verified on
    dynamic: bool
    low: int | None = None  # symbolic range of a dynamic dim; high None = unbounded
    high: int | None = None
    kind: str = ""  # static dims: PINNED | SIZE_ONE | MODEL | EXPORT
    reason: str = ""


@dataclass
class InputShape:
    name: str
    dims: list[DimShape]


@dataclass
class ShapeSummary:
    """One entry per graph placeholder (``None`` for a non-tensor input), plus how capture got there."""

    inputs: list[InputShape | None]
    widened: list[str] = field(default_factory=list)
    second_shape: str | None = None

    def dynamic(self) -> list[str]:
        return [f"{i.name} dim {d}: {_range_text(s)}" for i in self.inputs if i for d, s in enumerate(i.dims) if s.dynamic]

    def specialized(self) -> list[dict]:
        return [
            {"input": i.name, "dim": d, "size": s.size, "kind": s.kind, "reason": s.reason}
            for i in self.inputs if i for d, s in enumerate(i.dims) if not s.dynamic
        ]

    def lines(self) -> list[str]:
        lines = [f"dynamic: {', '.join(self.dynamic()) or 'none'}"]
        lines += [f"static: {s['input']} dim {s['dim']} = {s['size']} ({s['reason']})" for s in self.specialized()]
        if self.widened:
            lines.append(f"captured with size-1 dims widened to 2 and verified at 1: {', '.join(self.widened)}")
        if self.second_shape:
            lines.append(f"every pass also verified at a second shape: {self.second_shape}")
        return lines

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeSummary":
        inputs = [InputShape(i["name"], [DimShape(**d) for d in i["dims"]]) if i else None for i in data.get("inputs", [])]
        return cls(inputs, list(data.get("widened", [])), data.get("second_shape"))


def _range_text(dim: DimShape) -> str:
    return f"[{dim.low}, {'inf' if dim.high is None else dim.high}]"


# --- what to ask export for --------------------------------------------------------------


def bound_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)


def auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, dims_of: Callable | None = None) -> dict:
    """``dynamic_shapes`` (by forward-argument name) marking every dim of every input tensor ``Dim.AUTO``.

    ``dims_of(name, tensor)`` may narrow the dims marked (e.g. to those a graph already has symbolic).
    """

    def spec(path, leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            return None
        dims = range(leaf.ndim) if dims_of is None else dims_of(_path_name(path), leaf)
        return {d: Dim.AUTO for d in dims} or None

    return pytree.tree_map_with_path(spec, bound_arguments(model, args, kwargs))


def widen_size_one(model: torch.nn.Module, args: tuple, kwargs: dict, batch_only: bool) -> tuple[tuple, dict, list[str]]:
    """The inputs with every size-1 dim (or only dim 0) repeated to 2, and the dims widened.

    Export specializes sizes 0 and 1, so a batch-1 example would give a batch-1-only graph.
    """
    widened: list[str] = []

    def widen(path, leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        for d in range(leaf.ndim if not batch_only else min(leaf.ndim, 1)):
            if leaf.shape[d] == 1:
                leaf = torch.cat([leaf, leaf], dim=d)
                widened.append(f"{_path_name(path)} dim {d}")
        return leaf

    bound = pytree.tree_map_with_path(widen, bound_arguments(model, args, kwargs))
    signature = inspect.signature(model.forward).bind(*args, **kwargs)
    signature.arguments.update(bound)
    return tuple(signature.args), dict(signature.kwargs), widened


def _path_name(path) -> str:
    root, *rest = path
    return str(getattr(root, "key", getattr(root, "idx", root))) + pytree.keystr(tuple(rest))


# --- reading the captured graph ------------------------------------------------------------


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return list(gm.graph.find_nodes(op="placeholder"))


def input_names(gm: fx.GraphModule) -> list[str]:
    """Readable names of the placeholders: ``x``, ``input_ids``, ``inputs['mask']``."""
    nodes, spec = placeholders(gm), getattr(gm, "_in_spec", None)
    if spec is None or spec.num_leaves != len(nodes):
        return [n.name for n in nodes]
    paths = [p for p, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]]
    params = [p for p in inspect.signature(gm.forward).parameters]
    names = []
    for path in paths:
        kind, key, *rest = path
        root = params[key.idx] if kind.idx == 0 and key.idx < len(params) else getattr(key, "key", f"args[{getattr(key, 'idx', '?')}]")
        names.append(str(root) + pytree.keystr(tuple(rest)))
    return names


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    spec = getattr(gm, "_in_spec", None)
    return list(tree_flatten_spec((args, kwargs), spec)) if spec is not None else [*args, *kwargs.values()]


def unflatten_inputs(gm: fx.GraphModule, flat: list, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        new_args, new_kwargs = pytree.tree_unflatten(flat, spec)
        return tuple(new_args), dict(new_kwargs)
    return tuple(flat[: len(args)]), dict(zip(kwargs, flat[len(args):]))


def shape_env(gm: fx.GraphModule):
    for node in placeholders(gm):
        fake_mode = getattr(node.meta.get("val"), "fake_mode", None)
        if fake_mode is not None and fake_mode.shape_env is not None:
            return fake_mode.shape_env
    return None


def _symbol(size) -> sympy.Symbol | None:
    import sympy  # 1.3 s to import: only once a graph is captured
    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
        return size.node.expr
    return None


def _bounds(env, expr) -> tuple[int, int | None]:
    import sympy  # 1.3 s to import: only once a graph is captured
    from torch.utils._sympy.numbers import int_oo

    bound = env.bound_sympy(expr)
    high = bound.upper
    return int(bound.lower), (None if high in (int_oo, sympy.oo) or not high.is_finite else int(high))


def summarize(gm: fx.GraphModule, args: tuple, kwargs: dict, static_kind: str = "", static_reason: str = "",
              widened: list[str] | None = None) -> ShapeSummary:
    """Which dims of each input the captured graph keeps symbolic (with their range) and why the rest are static.

    ``static_kind``/``static_reason`` explain static dims the user pinned (``dynamic=False``, ``dynamic_shapes=``).
    """
    env = shape_env(gm)
    symbol_of = {s.name: sym for sym, sources in (env.var_to_sources.items() if env else ()) for s in sources}
    inputs = []
    for node, name, value in zip(placeholders(gm), input_names(gm), flat_inputs(gm, args, kwargs)):
        fake = node.meta.get("val")
        if not isinstance(fake, torch.Tensor) or not isinstance(value, torch.Tensor):
            inputs.append(None)
            continue
        dims = []
        for d, (size, example) in enumerate(zip(fake.shape, value.shape)):
            if isinstance(size, torch.SymInt) and size.node.expr.free_symbols:
                dims.append(DimShape(int(example), True, *_bounds(env, size.node.expr)))
                continue
            kind, reason = _why_static(env, symbol_of.get(_source_name(name, d)), int(size), static_kind, static_reason)
            dims.append(DimShape(int(size), False, kind=kind, reason=reason))
        inputs.append(InputShape(name, dims))
    return ShapeSummary(inputs, list(widened or []))


def _source_name(name: str, dim: int) -> str:
    root, bracket, rest = name.partition("[")
    return f"L['{root}']{bracket}{rest}.size()[{dim}]"


def _why_static(env, symbol, size: int, static_kind: str, static_reason: str) -> tuple[str, str]:
    import sympy  # 1.3 s to import: only once a graph is captured
    guard = _specializing_guard(env, symbol) if symbol is not None else None
    if guard is not None:
        where = str(guard.sloc).strip("() ")
        simple = isinstance(guard.expr, sympy.Eq) and guard.expr.rhs.is_number and guard.expr.lhs == symbol
        detail = "" if simple else f" (guard {guard.expr})"
        if _inside_torch(where):  # no user frame: an op's shape rule, e.g. a conv weight's in-channels
            return MODEL, f"fixed to {size} by the model: an op's shape rule requires it (torch/{where}){detail}"
        return MODEL, f"fixed to {size} by the model's code at {where}{detail}"
    if static_kind:
        return static_kind, static_reason
    if size in (0, 1):
        return SIZE_ONE, f"size {size} in the example (export specializes sizes 0 and 1; widening it to 2 did not capture)"
    return EXPORT, f"specialized to {size} by export"


def _inside_torch(location: str) -> bool:
    first = location.split("/", 1)[0]
    return "/" in location and os.path.exists(os.path.join(os.path.dirname(torch.__file__), first))


def _specializing_guard(env, symbol):
    import sympy  # 1.3 s to import: only once a graph is captured
    replacement = env.replacements.get(symbol)
    if replacement is None or not replacement.is_number:
        return None
    mentioning = [g for g in env.guards if symbol in g.expr.free_symbols]
    equalities = [g for g in mentioning if isinstance(g.expr, sympy.Eq)]
    return (equalities or mentioning or [None])[0]


# --- a second shape for verification --------------------------------------------------------


@dataclass
class ShapeProbe:
    """The example inputs resized along every dynamic dim, and the graph's outputs there."""

    args: tuple
    kwargs: dict
    description: str
    outputs: Any = None


def _candidates(example: int, low: int, high: int | None) -> list[int]:
    low = max(low, 2)  # 0 and 1 behave differently (broadcasting); not a fair second shape
    wanted = [example - 1, example + 1, example - 2, example + 2, 2 * example]
    return [v for i, v in enumerate(wanted) if v != example and v >= low and (high is None or v <= high) and v not in wanted[:i]]


def resize(value: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """``value`` truncated or tiled (repeated) to ``shape``: token ids stay ids, masks stay masks."""
    for d, size in enumerate(shape):
        if size != value.shape[d]:
            index = torch.arange(size, device=value.device) % value.shape[d]
            value = value.index_select(d, index)
    return value


def second_shape(gm: fx.GraphModule, args: tuple, kwargs: dict, run: Callable[[tuple, dict], Any], attempts: int = 4) -> ShapeProbe | None:
    """The example inputs resized so that every dynamic dim takes a different size in its captured range.

    Symbols that had the same size in the example move together (batch of ids and of mask). A
    candidate is kept if ``run`` (the graph before any pass) accepts it; ``None`` if the graph has no
    dynamic dim or runs at no nearby shape.
    """
    import sympy  # 1.3 s to import: only once a graph is captured
    env = shape_env(gm)
    if env is None:
        return None
    flat = flat_inputs(gm, args, kwargs)
    fakes = [n.meta.get("val") for n in placeholders(gm)]
    example_of: dict[sympy.Symbol, int] = {}
    for fake, value in zip(fakes, flat):
        if isinstance(fake, torch.Tensor) and isinstance(value, torch.Tensor):
            for size, concrete in zip(fake.shape, value.shape):
                if (sym := _symbol(size)) is not None:
                    example_of.setdefault(sym, int(concrete))
    if not example_of:
        return None
    groups: dict[int, list] = {}
    for sym, example in example_of.items():
        groups.setdefault(example, []).append(sym)
    choices = {}
    for example, syms in groups.items():
        low = max(_bounds(env, s)[0] for s in syms)
        highs = [h for h in (_bounds(env, s)[1] for s in syms) if h is not None]
        choices[example] = _candidates(example, low, min(highs) if highs else None)
    for attempt in range(attempts):
        assignment = {sym: (choices[ex][min(attempt, len(choices[ex]) - 1)] if choices[ex] else ex)
                      for ex, syms in groups.items() for sym in syms}
        if all(v == example_of[s] for s, v in assignment.items()):
            return None
        exact = {sym: sympy.Integer(v) for sym, v in assignment.items()}
        new_flat, changes = [], []
        for fake, value, name in zip(fakes, flat, input_names(gm)):
            if isinstance(fake, torch.Tensor) and isinstance(value, torch.Tensor):
                shape = [int(sympy.sympify(s.node.expr).xreplace(exact).xreplace(getattr(env, "backed_var_to_val", None) or env.var_to_val)) if isinstance(s, torch.SymInt) else int(s)
                         for s in fake.shape]
                if shape != list(value.shape):
                    changes.append(f"{name} {tuple(value.shape)} -> {tuple(shape)}")
                value = resize(value, shape)
            new_flat.append(value)
        new_args, new_kwargs = unflatten_inputs(gm, new_flat, args, kwargs)
        try:
            outputs = run(new_args, new_kwargs)
        except Exception:  # not a shape the model accepts; try the next one
            continue
        return ShapeProbe(new_args, new_kwargs, ", ".join(changes), outputs)
    return None


# --- shape guards that fail at call time ---------------------------------------------------


class ExplainedGuards(torch.nn.Module):
    """Wraps export's ``_guards_fn``: a failed guard becomes an :class:`InputShapeError` naming the
    input, the dim, the size it was captured at, and how to capture it dynamic."""

    _is_impure = True  # called for its checks only: dead-code elimination must keep it

    def __init__(self, guards: torch.nn.Module, summary: ShapeSummary):
        super().__init__()
        self.guards = guards
        self.summary = summary

    def forward(self, *args):
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.guards(*args)
        try:
            return self.guards(*args)
        except AssertionError as exc:
            raise InputShapeError(explain_guard_failure(self.summary, args, str(exc))) from exc


def install_guard_errors(gm: fx.GraphModule, summary: ShapeSummary) -> None:
    guards = getattr(gm, "_guards_fn", None)
    if guards is None:
        return
    if isinstance(guards, ExplainedGuards):
        guards = guards.guards
    gm._guards_fn = ExplainedGuards(guards, summary)


def explain_guard_failure(summary: ShapeSummary, args: tuple, guard_message: str) -> str:
    problems = []
    for shape, value in zip(summary.inputs, args):
        if shape is None or not isinstance(value, torch.Tensor):
            continue
        if value.ndim != len(shape.dims):
            problems.append(f"input {shape.name!r} has {value.ndim} dims; the model was captured with {len(shape.dims)}")
            continue
        for d, (dim, size) in enumerate(zip(shape.dims, value.shape)):
            if not dim.dynamic and size != dim.size:
                problems.append(f"input {shape.name!r} dim {d} has size {size}, but the model was captured with it "
                                f"fixed at {dim.size} ({dim.reason}). {_fix(dim, shape.name, d)}")
            elif dim.dynamic and ((dim.high is not None and size > dim.high) or (dim.low is not None and dim.low > 2 and size < dim.low)):
                problems.append(f"input {shape.name!r} dim {d} has size {size}, outside the range {_range_text(dim)} "
                                f"the model's code allows for it (captured at {dim.size})")
    if not problems:
        problems.append(f"the inputs break a shape constraint the model was captured with ({guard_message}); "
                        f"captured shapes: {'; '.join(summary.lines())}")
    return "; ".join(problems)


def _fix(dim: DimShape, name: str, d: int) -> str:
    if dim.kind == PINNED:
        return (f"To accept other sizes, capture it dynamic: leave dynamic=True (the default) or mark it in "
                f"dynamic_shapes, e.g. dynamic_shapes={{{name.split('[')[0]!r}: {{{d}: Dim.AUTO}}}}")
    if dim.kind == SIZE_ONE:
        return f"To accept other sizes, capture with an example whose {name!r} dim {d} is at least 2"
    if dim.kind == MODEL:
        return f"The model's code fixes this size: pass inputs with {name!r} dim {d} = {dim.size}, or change the model"
    return f"Pass inputs with {name!r} dim {d} = {dim.size}, or capture with an example of another size there"
