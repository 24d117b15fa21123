"""Modules that run a compressed projection as the graph runs it: what :func:`fxcompress.apply_to_model`
puts in place of an ``nn.Linear`` / HF ``Conv1D`` that a pass rewrote.

* :class:`Int8Linear` — one fxcompress int8 op (``torch.ops.fxcompress.int8_linear`` and its static,
  weight-only and quantized-engine siblings), the very op and lowering the ``int8`` pass chose for the
  node on this machine, with the node's int8 weight, scales, bias and SmoothQuant ``1/σ``;
* :class:`Int8Embedding` — a weight-only int8 token table (``fxcompress::int8_embedding``), and
  :class:`TiedInt8Linear` — an int8 LM head reading that table (a tied head stays tied, stored once);
* :class:`LowRankLinear` — the chain of stages a factorized layer became (``x → x V_rᵀ → · (U_r S_r)ᵀ + b``),
  each an ``nn.Linear`` (trainable) or an :class:`Int8Linear` when ``int8`` ran after ``low_rank``.

:func:`stage_nodes` finds the rewritten stages in a graph, per module path; :func:`layer_from_stages`
builds the module from them. Every module has ``in_features``/``out_features`` and a JSON ``spec()`` from
which :func:`layer_from_spec` rebuilds an empty one of the same shapes (the loader fills it from the
saved state dict). A fused activation of the graph (``int8_linear(..., "relu")``) is not carried over:
the model's own activation module follows the projection and applies it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import ir, ops  # noqa: F401  (ops registers torch.ops.fxcompress.*)

aten = torch.ops.aten
INT8_OPS = ("int8_linear", "int8_linear_static", "int8_weight_only_linear", "int8_weight_only_linear_bf16", "int8_linear_qengine",
            "int8_linear_by_rows")
_INT8_TARGETS = {getattr(torch.ops.fxcompress, name).default: name for name in INT8_OPS}
_INT8_EMBEDDING = torch.ops.fxcompress.int8_embedding.default


class Int8Linear(torch.nn.Module):
    """``y = op(x / σ, [s_x,] W_q, s_w, b[, engine])`` for one fxcompress int8 ``op`` (see ``fxcompress.ops.int8_linear``).

    ``int8_linear_by_rows`` takes ``by_rows = (decode engine, prefill engine, max decode rows)`` and, when
    its decode engine is ``float``, the ``float_weight``: the module dispatches by row count as the graph does.
    """

    def __init__(self, op: str, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, smooth_inverse: torch.Tensor | None = None, engine: str | None = None,
                 float_weight: torch.Tensor | None = None, by_rows: tuple[str, str, int] | None = None):
        super().__init__()
        self._set_op(op, engine, weight_q.shape)
        if (op == "int8_linear_by_rows") != (by_rows is not None):
            raise ValueError("Int8Linear: by_rows=(decode engine, prefill engine, max decode rows) is given exactly for op='int8_linear_by_rows'")
        self.by_rows = None if by_rows is None else tuple(by_rows)
        for name, value in (("weight_q", weight_q), ("weight_scale", weight_scale), ("bias", bias),
                            ("input_scale", input_scale), ("smooth_inverse", smooth_inverse), ("float_weight", float_weight)):
            self.register_buffer(name, value)

    def _set_op(self, op: str, engine: str | None, shape) -> None:
        if op not in INT8_OPS:
            raise ValueError(f"Int8Linear: op must be one of {INT8_OPS}, not {op!r}")
        self.op, self.engine = op, engine
        self.out_features, self.in_features = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_inverse is not None:
            x = x * self.smooth_inverse
        op, weight_q, weight_scale = getattr(torch.ops.fxcompress, self.op), self.weight_q, self.weight_scale
        if self.op in ("int8_weight_only_linear", "int8_weight_only_linear_bf16"):
            return op(x, weight_q, weight_scale, self.bias)
        if self.op == "int8_linear_static":
            return op(x, self.input_scale, weight_q, weight_scale, self.bias, "none")
        if self.op == "int8_linear_qengine":
            return op(x, weight_q, weight_scale, self.bias, "none", self.engine)
        if self.op == "int8_linear_by_rows":
            return op(x, weight_q, weight_scale, self.bias, self.float_weight, "none", *self.by_rows)
        return op(x, weight_q, weight_scale, self.bias, "none")

    def spec(self) -> dict:
        return {"kind": "int8", "op": self.op, "engine": self.engine, "in": self.in_features, "out": self.out_features,
                **{name: getattr(self, name) is not None for name in ("bias", "input_scale", "smooth_inverse", "float_weight")},
                **({"by_rows": list(self.by_rows)} if self.by_rows else {})}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, op={self.op}" + (f", engine={self.engine}" if self.engine else "")
                + (f", by_rows={self.by_rows}" if self.by_rows else ""))


class Int8Embedding(torch.nn.Module):
    """A weight-only int8 token table: ``fxcompress::int8_embedding(ids, W_q, s_w)`` (per-row scales)."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight_q.shape
        self.dtype, self.padding_idx = dtype, padding_idx
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxcompress.int8_embedding(indices, self.weight_q, self.weight_scale, self.dtype)

    def spec(self) -> dict:
        return {"kind": "int8_embedding", "num": self.num_embeddings, "dim": self.embedding_dim,
                "dtype": str(self.dtype).removeprefix("torch."), "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class TiedInt8Linear(Int8Linear):
    """An int8 LM head tied to an :class:`Int8Embedding`: it reads the table's ``W_q, s_w`` (stored once, in the
    embedding; the reference is not a submodule, so the state dict holds the table once)."""

    def __init__(self, op: str, embedding: Int8Embedding, embedding_path: str, bias: torch.Tensor | None = None,
                 engine: str | None = None):
        torch.nn.Module.__init__(self)
        self._set_op(op, engine, embedding.weight_q.shape)
        self.__dict__["embedding"], self.embedding_path = embedding, embedding_path
        self.by_rows = None
        for name, value in (("bias", bias), ("input_scale", None), ("smooth_inverse", None), ("float_weight", None)):
            self.register_buffer(name, value)

    @property
    def weight_q(self) -> torch.Tensor:
        return self.embedding.weight_q

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.embedding.weight_scale

    def spec(self) -> dict:
        return {**super().spec(), "kind": "int8_tied", "embedding": self.embedding_path}


class LowRankLinear(torch.nn.Sequential):
    """A factorized projection: its stages in order (``nn.Linear`` or :class:`Int8Linear`), bias on the last."""

    def __init__(self, *stages: torch.nn.Module):
        super().__init__(*stages)
        self.in_features, self.out_features = stages[0].in_features, stages[-1].out_features

    def spec(self) -> dict:
        return {"kind": "low_rank", "stages": [_stage_spec(stage) for stage in self]}


def _stage_spec(stage: torch.nn.Module) -> dict:
    if isinstance(stage, Int8Linear):
        return stage.spec()
    return {"kind": "linear", "in": stage.in_features, "out": stage.out_features, "bias": stage.bias is not None}


def layer_from_spec(spec: dict, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """An empty module of ``spec``'s kind and shapes (values come from a state dict, loaded with ``assign=True``);
    a tied head's embedding is looked up in ``model`` (rebuild the embeddings first)."""
    if spec["kind"] == "int8_embedding":
        return Int8Embedding(torch.zeros(spec["num"], spec["dim"], dtype=torch.int8), torch.ones(spec["num"]),
                             getattr(torch, spec["dtype"]), spec["padding_idx"])
    if spec["kind"] == "int8_tied":
        return TiedInt8Linear(spec["op"], model.get_submodule(spec["embedding"]), spec["embedding"],
                              torch.zeros(spec["out"]) if spec["bias"] else None, spec["engine"])
    if spec["kind"] == "low_rank":
        return LowRankLinear(*(layer_from_spec(stage) for stage in spec["stages"]))
    if spec["kind"] == "linear":
        return torch.nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    if spec["kind"] == "conv1d":  # GPT-2's projection, resized by pruning
        from transformers.pytorch_utils import Conv1D  # here: only a saved GPT-style model needs transformers

        return Conv1D(spec["out"], spec["in"])
    n, k = spec["out"], spec["in"]
    return Int8Linear(spec["op"], torch.zeros(n, k, dtype=torch.int8), torch.ones(n),
                      torch.zeros(n) if spec["bias"] else None, torch.ones(1) if spec["input_scale"] else None,
                      torch.ones(k) if spec["smooth_inverse"] else None, spec["engine"],
                      torch.zeros(n, k) if spec.get("float_weight") else None, spec.get("by_rows"))


def stage_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module path -> the graph's projection stages computed for it, in order: ``aten.linear`` calls with a
    stored weight, int8 op calls, and the ``getitem`` slices of int8 GEMMs fused over sibling layers
    (``int8`` names each slice by its layer)."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _INT8_TARGETS and not any(_fused_siblings(user) for user in node.users):
            found.setdefault(ir.module_path(node), []).append(node)
        elif node.target is operator.getitem and _fused_int8_slice(node) is not None:
            found.setdefault(ir.module_path(node), []).append(node)
        elif node.target is aten.linear.default and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            found.setdefault(ir.module_path(node), []).append(node)
    return found


def _fused_int8_slice(node: fx.Node) -> tuple[fx.Node, slice] | None:
    """(int8 op node, its output rows) of ``getitem(split_with_sizes(int8_op(...), sizes), i)``."""
    split = node.args[0]
    if not _fused_siblings(split):
        return None
    sizes = split.args[1]
    start = sum(sizes[: node.args[1]])
    return split.args[0], slice(start, start + sizes[node.args[1]])


def _fused_siblings(split: fx.Node) -> bool:
    """``split_with_sizes(int8_op(...), sizes, -1)`` whose parts are distinct layers (the first the op's own):
    the ``int8`` pass's GEMM over sibling linears, not a split the model itself makes (Phi-3's ``chunk``)."""
    if not (isinstance(split, fx.Node) and split.target is aten.split_with_sizes.default):
        return False
    gemm = split.args[0]
    if not (isinstance(gemm, fx.Node) and gemm.target in _INT8_TARGETS) or split.args[2] not in (-1, len(ir.fake_shape(gemm) or ()) - 1):
        return False
    parts = sorted(split.users, key=lambda user: user.args[1] if user.target is operator.getitem else -1)
    paths = [ir.module_path(part) for part in parts]
    return all(p.target is operator.getitem for p in parts) and len(set(paths)) == len(paths) and paths[0] == ir.module_path(gemm)


def stage_input(node: fx.Node) -> fx.Node:
    """The value a stage reads: the linear's input, the int8 op's ``x`` (before SmoothQuant's ``x · 1/σ``)."""
    sliced = _fused_int8_slice(node) if node.target is operator.getitem else None
    gemm = sliced[0] if sliced else node
    x = gemm.args[0]
    smooth = _smooth_inverse(gemm)
    return x.args[0] if smooth is not None else x


def _smooth_inverse(gemm: fx.Node) -> fx.Node | None:
    x = gemm.args[0]
    if gemm.target in _INT8_TARGETS and x.target is aten.mul.Tensor and isinstance(x.args[1], fx.Node) \
            and x.args[1].op == "get_attr" and ir.module_path(x) == ir.module_path(gemm):
        return x.args[1]
    return None


def stage_tensors(node: fx.Node) -> list[str]:
    """The stored tensors (get_attr targets) a stage reads."""
    sliced = _fused_int8_slice(node) if node.target is operator.getitem else None
    gemm = sliced[0] if sliced else node
    reads = [a for a in gemm.args[1:] if isinstance(a, fx.Node)] + [s for s in [_smooth_inverse(gemm)] if s is not None]
    return [a.target for a in reads if a.op == "get_attr"]


def embedding_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Module path -> the ``fxcompress::int8_embedding`` lookup computed for it."""
    return {ir.module_path(n): n for n in gm.graph.nodes if n.op == "call_function" and n.target is _INT8_EMBEDDING}


def embedding_from_node(gm: fx.GraphModule, node: fx.Node, padding_idx: int | None = None) -> Int8Embedding:
    _, weight_q, weight_scale, dtype = node.args
    return Int8Embedding(ir.get_attr(gm, weight_q.target).detach().clone(), ir.get_attr(gm, weight_scale.target).detach().clone(),
                         dtype, padding_idx)


def layer_from_stages(gm: fx.GraphModule, stages: list[fx.Node], tables: dict[str, tuple[Int8Embedding, str]] | None = None) -> torch.nn.Module:
    """The module computing ``stages`` (a chain: each reads the previous one's output); ``tables`` maps the
    int8 table of an :class:`Int8Embedding` (its ``W_q``'s graph name) to (module, path), so a head that reads it is tied."""
    for previous, stage in zip(stages, stages[1:]):
        if stage_input(stage) is not previous:
            raise ValueError(f"{stage.name} does not read {previous.name}: the layer's stages are not one chain")
    modules = [_stage_module(gm, stage, tables or {}) for stage in stages]
    return modules[0] if len(modules) == 1 else LowRankLinear(*modules)


def _stage_module(gm: fx.GraphModule, node: fx.Node, tables: dict) -> torch.nn.Module:
    sliced = _fused_int8_slice(node) if node.target is operator.getitem else None
    gemm, rows = sliced if sliced else (node, slice(None))
    args = ir.call_arguments(gemm)
    computed = [name for name, a in args.items() if name not in ("input", "x") and isinstance(a, fx.Node) and a.op != "get_attr"]
    if computed:
        raise ValueError(f"{gemm.name} reads {', '.join(computed)} computed in the graph, not stored")

    def stored(name: str) -> torch.Tensor | None:
        arg = args.get(name)
        return None if arg is None else ir.get_attr(gm, arg.target).detach().clone()

    if gemm.target is aten.linear.default:
        weight, bias = stored("weight"), stored("bias")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
        linear.weight = torch.nn.Parameter(weight)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias)
        return linear
    bias = stored("bias")
    smooth = _smooth_inverse(gemm)
    table = tables.get(args["weight_q"].target)
    if table is not None and sliced is None and smooth is None:
        return TiedInt8Linear(_INT8_TARGETS[gemm.target], *table, bias, args.get("engine"))
    return Int8Linear(
        _INT8_TARGETS[gemm.target], stored("weight_q")[rows].contiguous(), stored("weight_scale")[rows].contiguous(),
        None if bias is None else bias[rows].contiguous(), stored("input_scale"),
        None if smooth is None else ir.get_attr(gm, smooth.target).detach().clone(), args.get("engine"),
        None if args.get("float_weight") is None else stored("float_weight")[rows].contiguous(),
        (args["small"], args["large"], args["max_small_rows"]) if "max_small_rows" in args else None,
    )
