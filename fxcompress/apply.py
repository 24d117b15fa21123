"""Apply a compressed graph's decisions back onto a copy of the user's module (route (a) of generation).

The graph stays the place where every decision is made and verified; :func:`apply_to_model` only
transfers the result: each parameter/buffer of the graph that names a tensor of the model (export keeps
the model's dotted names) replaces that tensor in a deep copy — with every alias of it, so tied
weights stay tied — and the modules' size attributes follow the new shapes (``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``, HF ``Conv1D``, attention head counts). The result is the model's
own class, so ``generate`` (with its KV cache), ``save_pretrained`` and fine-tuning keep working.

Layers a pass rewrote into new tensors (``int8`` weights and scales, ``low_rank`` factors, both in turn)
become :mod:`fxcompress.layers` modules (mixture-of-experts experts modules with int8 grouped GEMMs their
int8 subclass, :mod:`fxcompress.expert_layers`) in place of their ``nn.Linear`` / ``Conv1D``, built from the
graph's own stages (the same custom op, lowering and tensors) — an ``nn.Embedding`` whose table became
int8 (``Int8(embeddings=True)``) an ``Int8Embedding``, a tied LM head reading that table a
``TiedInt8Linear`` (tied, stored once) —, and are listed in the config's
``quantization_config`` (``quant_method="fxcompress"``, :func:`fxcompress.hf_quantizer.register_quantizer`) so
``save_pretrained`` + :func:`load_pretrained` rebuild them. A graph holding tensors the model has no
place for otherwise (folded BatchNorm), or that rewrote a module that is not a Linear/Conv1D, is
refused with the names.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from . import hf_quantizer
from .errors import FxCompressWarning, InvalidInputError
from .hf import fit_module_sizes, output_width


def apply_to_model(gm: fx.GraphModule, model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` (eval mode) computing what ``gm`` computes; ``model`` is not mutated."""
    result = copy.deepcopy(model).eval()
    aliases = _aliases(result)
    graph_tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())
    replaced, consumed = _replace_layers(gm, result, set(aliases))
    foreign = sorted(name for name in graph_tensors if name not in aliases and name not in consumed)
    if foreign:
        raise InvalidInputError(
            f"apply_to_model: the graph holds tensors the model has no place for ({', '.join(foreign[:4])}"
            f"{', ...' if len(foreign) > 4 else ''}): only nn.Linear/Conv1D layers rewritten by low_rank/int8 get "
            "replacement modules (fold_bn and other rewrites cannot be applied back). Use the graph itself."
        )
    alive = {id(m) for m in result.modules()}
    present = {id(aliases[name]) for name in graph_tensors if name in aliases}  # one holder list per tensor
    dropped = sorted(name for name, _ in result.named_parameters()
                     if name in aliases and id(aliases[name]) not in present and not _under(name, replaced))
    if dropped:
        raise InvalidInputError(
            f"apply_to_model: the graph no longer reads the model's parameters {', '.join(dropped[:4])}"
            f"{', ...' if len(dropped) > 4 else ''} (folded or removed by a pass); the module would still apply them. "
            "Apply a pipeline of eliminate_identity/prune_channels/low_rank/int8, or use the graph itself."
        )
    written = set()
    for name, value in graph_tensors.items():
        holders = [(owner, leaf) for owner, leaf in aliases.get(name, []) if id(owner) in alive]
        if not holders or id(aliases[name]) in written:
            continue
        written.add(id(aliases[name]))
        old = getattr(*holders[0])
        new = torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) \
            else value.detach().clone()
        for owner, leaf in holders:  # one new tensor for every holder: tied weights stay one tensor
            (owner._parameters if isinstance(old, torch.nn.Parameter) else owner._buffers)[leaf] = new
    for module in reversed(list(result.modules())):  # projections before the attention reading them
        fit_module_sizes(module)
    _fit_config(result, model, replaced)
    return result


def _replace_layers(gm: fx.GraphModule, result: torch.nn.Module, model_tensors: set[str]) -> tuple[dict[str, torch.nn.Module], set[str]]:
    """Put a :mod:`fxcompress.layers` module in place of every Linear/Conv1D whose graph stages were
    rewritten (int8 ops, low-rank factors); returns {path: new module} and the graph tensors they took."""
    from . import layers  # here: layers load the custom ops, import fxcompress stays fast

    replaced, consumed, tables = {}, set(), {}
    for path, node in layers.embedding_nodes(gm).items():
        original = result.get_submodule(path) if path else result
        if not isinstance(original, torch.nn.Embedding):
            raise InvalidInputError(f"apply_to_model: {path or 'the model'} ({type(original).__name__}) was rewritten to an int8 "
                                    "embedding, but only nn.Embedding submodules can be replaced. Use the graph itself.")
        layer = layers.embedding_from_node(gm, node, original.padding_idx)
        _set_submodule(result, path, layer)
        replaced[path] = layer
        reads = [a.target for a in node.args[1:3]]
        consumed.update(reads)
        tables[reads[0]] = (layer, path)
    for path, stages in layers.stage_nodes(gm).items():
        reads = [name for stage in stages for name in layers.stage_tensors(stage)]
        if all(s.target is torch.ops.aten.linear.default for s in stages) and set(reads) <= model_tensors:
            continue  # the model's own linear, at most resized
        original = result.get_submodule(path) if path else result
        if not path or not (isinstance(original, torch.nn.Linear) or type(original).__name__ == "Conv1D"):
            raise InvalidInputError(
                f"apply_to_model: {path or 'the model'} ({type(original).__name__}) was rewritten by low_rank/int8, but only "
                "nn.Linear and transformers Conv1D submodules can be replaced by an fxcompress layer. Use the graph itself."
            )
        try:
            layer = layers.layer_from_stages(gm, stages, tables)
        except ValueError as exc:
            raise InvalidInputError(f"apply_to_model: cannot rebuild layer {path}: {exc}. Use the graph itself.") from exc
        _set_submodule(result, path, layer)
        replaced[path] = layer
        consumed.update(reads)
    _replace_experts(gm, result, replaced, consumed)
    return replaced, consumed


def _replace_experts(gm: fx.GraphModule, result: torch.nn.Module, replaced: dict, consumed: set[str]) -> None:
    """Experts modules whose grouped GEMMs became ``int8_grouped_linear`` become their int8 subclass (in place: a copy)."""
    from . import expert_layers  # here: it loads the custom ops, import fxcompress stays fast

    for path, nodes in expert_layers.expert_nodes(gm).items():
        try:
            layer, taken = expert_layers.experts_from_nodes(gm, result.get_submodule(path), path, nodes)
        except (ValueError, AttributeError) as exc:
            raise InvalidInputError(f"apply_to_model: cannot rebuild the experts {path or 'of the model'}: {exc}. "
                                    "Use the graph itself.") from exc
        replaced[path] = layer
        consumed.update(taken)


def _set_submodule(model: torch.nn.Module, path: str, layer: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, layer)


def _under(name: str, paths) -> bool:
    return any(name.startswith(path + ".") for path in paths)


def _aliases(model: torch.nn.Module) -> dict[str, list[tuple[torch.nn.Module, str]]]:
    """Dotted name -> every (owner module, attribute) holding the same tensor (tied weights)."""
    holders: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    names: dict[str, int] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for leaf, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None:
                continue
            holders.setdefault(id(tensor), [])
            if (module, leaf) not in holders[id(tensor)]:
                holders[id(tensor)].append((module, leaf))
            names[f"{prefix}.{leaf}" if prefix else leaf] = id(tensor)
    return {name: holders[key] for name, key in names.items()}


def _fit_config(model: torch.nn.Module, original: torch.nn.Module, replaced: dict[str, torch.nn.Module]) -> None:
    """The HF config follows the new sizes where every layer agrees (``scope='local'`` prunes equal groups
    equally). Replaced layers, and — where layers differ in a size the config holds once — every resized
    projection, are listed in ``config.quantization_config`` (``quant_method='fxcompress'``): ``load_pretrained``
    builds them at their shapes before the tensors load (``hf_quantizer.register_quantizer``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    layers = {path: layer.spec() for path, layer in replaced.items()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if any(layer is head for layer in replaced.values()) and getattr(config, "tie_word_embeddings", False):
        # the head is an int8/low-rank layer now: HF's tying by `.weight` no longer applies (a TiedInt8Linear
        # reads its Int8Embedding's table itself, stored once)
        config.tie_word_embeddings = False
    differing = _fit_config_sizes(model, config)
    if differing:
        resized, other = _resized_layers(model, original, replaced)
        if other:
            warnings.warn(
                f"fxcompress: layers differ in {', '.join(differing)}, which the config holds once, and {', '.join(other[:3])} "
                "changed shape (not a Linear/Conv1D the loader can rebuild); the returned model runs, but "
                "save_pretrained/from_pretrained cannot rebuild it. Prune every layer alike (scope='local').",
                FxCompressWarning, stacklevel=3,
            )
        else:
            layers |= resized
    if layers:
        config.quantization_config = hf_quantizer.quantization_config(layers)


def _fit_config_sizes(model: torch.nn.Module, config) -> list[str]:
    """Set the config's size fields that every layer agrees on; the sizes it cannot hold once."""
    found = _sizes_found(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(getattr(embeddings, "embedding_dim", None), int):  # nn.Embedding or Int8Embedding
        found["hidden_size"] = {embeddings.embedding_dim}
    differing = sorted(field for field, values in found.items() if len(values) > 1)
    width = found.pop("attention_width", None)  # GPT-2 ties its attention width to hidden_size
    hidden = found.get("hidden_size", {getattr(config, "hidden_size", None)})
    if width is not None and width != hidden:
        differing.append("attention width vs hidden_size")
    if any(hasattr(m, "qkv_proj") for m in model.modules()) and {"num_attention_heads", "num_key_value_heads"} & set(differing):
        raise InvalidInputError(
            "apply_to_model: the layers' fused qkv projections were pruned to different head counts; the model "
            "slices them by its config's single head count. Prune every layer alike (scope='local')."
        )
    for field, values in found.items():
        if len(values) == 1 and (hasattr(config, field) or field == "head_dim"):  # HF reads head_dim if set
            setattr(config, field, values.pop())
        elif len(values) == 1 and field in MOE_MLP_FIELDS.values() | {"moe_intermediate_size"}:
            differing.append(f"{field} (the config has no such field)")
    return differing


def _resized_layers(model: torch.nn.Module, original: torch.nn.Module, replaced: dict) -> tuple[dict[str, dict], list[str]]:
    """(path -> spec of every Linear/Conv1D whose weight changed shape, the other modules whose tensors did)."""
    before = {path: {name: t.shape for name, t in m.named_parameters(recurse=False)} for path, m in original.named_modules()}
    specs, other = {}, []
    for path, module in model.named_modules():
        shapes = {name: t.shape for name, t in module.named_parameters(recurse=False)}
        if path in replaced or path not in before or shapes == before[path]:
            continue
        if isinstance(module, torch.nn.Linear):
            specs[path] = {"kind": "linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
        elif type(module).__name__ == "Conv1D":
            specs[path] = {"kind": "conv1d", "in": module.weight.shape[0], "out": module.weight.shape[1]}
        else:
            other.append(path)
    return specs, other


MOE_MLP_FIELDS = {"shared_expert": "shared_expert_intermediate_size"}
"""MLPs inside a mixture-of-experts block whose width has its own config field (Qwen-MoE's shared expert);
other MLPs there (per-expert modules) use ``moe_intermediate_size``."""


def _sizes_found(model: torch.nn.Module) -> dict[str, set[int]]:
    """Config field -> the sizes the model's attention and MLP modules imply (MLPs in MoE blocks: their own fields)."""
    found: dict[str, set[int]] = {}
    moe_blocks = [path + "." for path, module in model.named_modules() if isinstance(getattr(module, "experts", None), torch.nn.Module)]
    for path, module in model.named_modules():
        in_moe = any(path.startswith(block) for block in moe_blocks)
        for field, value in _config_sizes(module):
            if in_moe and field == "intermediate_size":
                field = MOE_MLP_FIELDS.get(path.rsplit(".", 1)[-1], "moe_intermediate_size")
            elif in_moe:
                continue
            found.setdefault(field, set()).add(value)
    return found


def _config_sizes(module: torch.nn.Module) -> list[tuple[str, int]]:
    """(config field, size) pairs one attention or MLP module implies."""
    head_dim, sizes = getattr(module, "head_dim", None), []
    if isinstance(head_dim, int) and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
        sizes += [("num_attention_heads", module.q_proj.out_features // head_dim),
                  ("num_key_value_heads", module.k_proj.out_features // head_dim), ("head_dim", head_dim)]
    elif isinstance(head_dim, int) and hasattr(module, "qkv_proj"):  # q | k | v rows; o_proj reads the query heads
        heads = module.o_proj.in_features // head_dim
        kv_heads = (module.qkv_proj.out_features // head_dim - heads) // 2
        group = module.num_key_value_groups = heads // kv_heads
        module.num_key_value_heads = kv_heads
        sizes += [("num_attention_heads", kv_heads * group), ("num_key_value_heads", kv_heads), ("head_dim", head_dim)]
    elif isinstance(head_dim, int) and hasattr(module, "c_attn"):
        sizes += [("num_attention_heads", module.num_heads), ("attention_width", module.split_size)]
    if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
        sizes.append(("intermediate_size", module.up_proj.out_features))
    elif isinstance(getattr(module, "gate_up_proj", None), torch.nn.Module):  # Phi-3's fused Linear, not MoE experts' [E, 2I, H]
        sizes.append(("intermediate_size", output_width(module.gate_up_proj) // 2))
    elif hasattr(module, "c_fc") and output_width(module.c_fc):
        sizes.append(("n_inner", output_width(module.c_fc)))
    return sizes


def load_pretrained(model_class, directory, **kwargs) -> torch.nn.Module:
    """``model_class.from_pretrained(directory, **kwargs)`` for a model saved after :func:`apply_to_model`:
    registers ``quant_method="fxcompress"`` first, so its int8 / low-rank layers are rebuilt before their
    tensors load (needed once per process; plain ``from_pretrained`` works after it)."""
    hf_quantizer.register_quantizer()
    return model_class.from_pretrained(directory, **kwargs)
