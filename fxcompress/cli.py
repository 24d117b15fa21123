"""Command line: ``fxcompress optimize PKG.MODULE:FACTORY ...``, ``fxcompress demo``, ``fxcompress passes``."""

from __future__ import annotations

import argparse
import dataclasses
import ast
import importlib
import json
import sys
from pathlib import Path

import torch

from . import api, models, serialize
from .errors import FxCompressError, InvalidInputError
from .quiet import progress_enabled
from .registry import make_pass, registered_passes
from .search import Target, parse_target

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "long": torch.long, "int64": torch.long}


def load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise InvalidInputError(f"model spec {spec!r} must look like PKG.MODULE:FACTORY, e.g. fxcompress.models:resnet_small")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInputError(f"cannot load {spec!r}: {exc}") from exc
    return factory


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError as exc:
        raise InvalidInputError(f"--input-shape {text!r} must be comma-separated integers, e.g. 1,3,224,224") from exc


def example_input(shape: tuple[int, ...], dtype: str, high: int) -> torch.Tensor:
    if dtype not in DTYPES:
        raise InvalidInputError(f"--input-dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    generator = torch.Generator().manual_seed(0)
    if DTYPES[dtype].is_floating_point:
        return torch.randn(shape, generator=generator).to(DTYPES[dtype])
    return torch.randint(0, high, shape, generator=generator)


def build_passes(names: str | None, options: list[str], tune: bool = True) -> list | None:
    """``--passes a,b`` plus ``--option a.key=value`` (values are Python literals) -> pass objects.

    ``tune=False`` (``--no-tune``) sets ``tune=False`` on every pass that measures its lowering."""
    if names is None and not options:
        return None
    pass_names = [n for n in (names or ",".join(api.DEFAULT_PASSES)).split(",") if n]
    per_pass: dict[str, dict] = {n: {} for n in pass_names}
    for item in options:
        key, sep, value = item.partition("=")
        pass_name, dot, option = key.partition(".")
        if not sep or not dot:
            raise InvalidInputError(f"--option {item!r} must look like PASS.OPTION=VALUE, e.g. low_rank.rank=0.5")
        if pass_name not in per_pass:
            raise InvalidInputError(f"--option {item!r} names pass {pass_name!r}, which is not in --passes {pass_names}")
        try:
            per_pass[pass_name][option] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            per_pass[pass_name][option] = value
    if not tune:
        known = registered_passes()
        for n in pass_names:
            if n in known and "tune" in {f.name for f in dataclasses.fields(known[n])}:
                per_pass[n].setdefault("tune", False)
    return [make_pass(n, **per_pass[n]) for n in pass_names]


def cmd_optimize(args: argparse.Namespace) -> None:
    model = load_factory(args.model)()
    inputs = (example_input(parse_shape(args.input_shape), args.input_dtype, args.vocab_size),)
    target = _target(args)
    passes = build_passes(args.passes, args.option, tune=not args.no_tune) if target is None else None
    compressed = api.optimize(model.eval(), inputs, passes, dynamic=not args.static, target=target)
    if target is not None:
        _report_search(compressed.search, args)
    print(compressed.report)
    if args.json:
        Path(args.json).write_text(compressed.report.to_json(indent=2))
    if args.out:
        serialize.save(compressed, args.out)
        print(f"\nsaved to {args.out}")


def _target(args: argparse.Namespace):
    if args.target is None and args.max_error is None:
        return None
    if args.passes or args.option:
        raise InvalidInputError("--target/--max-error search for the passes; leave out --passes/--option (or drop --target)")
    kinds = tuple(args.search_passes.split(",")) if args.search_passes else Target.passes
    if args.target is None:
        return Target(max_error=args.max_error, passes=kinds)
    found = parse_target(args.target, args.max_error)
    return Target(**{found.resource: found.budget}, max_error=found.max_error, passes=kinds)


def _report_search(found, args: argparse.Namespace) -> None:
    print(found, end="\n\n")
    if args.save_pipeline:
        found.save_pipeline(args.save_pipeline)
        print(f"pipeline saved to {args.save_pipeline} (replay: passes=fxcompress.search.load_pipeline(path))")
    if args.plot:
        print(f"Pareto plot: {found.plot(args.plot)}")


def cmd_demo(args: argparse.Namespace) -> None:
    names = list(models.EXAMPLES) if args.model == "all" else [args.model]
    results = {}
    for number, name in enumerate(names, 1):
        factory, inputs = models.EXAMPLES[name]
        if progress_enabled(None):
            print(f"[{number}/{len(names)}] optimizing {name} ...", file=sys.stderr, flush=True)
        compressed = api.optimize(factory(), inputs(), build_passes(args.passes, args.option, tune=not args.no_tune))
        print(f"\n## {name}\n{compressed.report}", flush=True)
        results[name] = compressed.report.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def cmd_passes(args: argparse.Namespace) -> None:
    for name, cls in registered_passes().items():
        kind = "lossless" if cls.lossless else "lossy"
        options = cls.options_help()
        print(f"{name} ({kind})" + (f"\n{options}" if options else ""))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxcompress", description="Compress a PyTorch model with verified graph passes.")
    sub = p.add_subparsers(dest="command", required=True)

    def pipeline_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--passes", help=f"comma-separated pass names (default: {','.join(api.DEFAULT_PASSES)})")
        q.add_argument("--option", action="append", default=[], help="PASS.OPTION=VALUE, e.g. prune_channels.ratio=0.5")
        q.add_argument("--json", help="also write the report as JSON to this file")
        q.add_argument("--no-tune", action="store_true",
                       help="do not time kernel candidates: lower with the static table per CPU feature (int8)")

    opt = sub.add_parser("optimize", help="optimize a model built by PKG.MODULE:FACTORY")
    opt.add_argument("model", help="PKG.MODULE:FACTORY, a callable returning the nn.Module")
    opt.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,224,224")
    opt.add_argument("--input-dtype", default="float32", help=f"one of {', '.join(DTYPES)} (long: token ids)")
    opt.add_argument("--vocab-size", type=int, default=1000, help="upper bound of random token ids for integer inputs")
    opt.add_argument("--out", help="save the optimized model (.pt2)")
    opt.add_argument("--static", action="store_true", help="pin every input dim to the example's size (default: dynamic where the model allows)")
    pipeline_args(opt)
    opt.add_argument("--target", help="search the pipeline for a budget: latency=0.5 | size=0.25 | macs=0.4 (fraction of the input model)")
    opt.add_argument("--max-error", type=float, help="error allowed (1 - cosine of the outputs); alone: the fastest pipeline within it")
    opt.add_argument("--search-passes", help="lossy passes the search may use (default: prune_channels,low_rank,int8)")
    opt.add_argument("--save-pipeline", help="with --target: write the chosen pipeline as JSON")
    opt.add_argument("--plot", help='with --target: write the Pareto plot (PNG; needs matplotlib: pip install "fxcompress[plot]")')
    opt.set_defaults(func=cmd_optimize)

    demo = sub.add_parser("demo", help="optimize the example models the package ships and print the per-pass table")
    demo.add_argument("--model", default="all", choices=["all", *models.EXAMPLES])
    pipeline_args(demo)
    demo.set_defaults(func=cmd_demo)

    lst = sub.add_parser("passes", help="list registered passes and their options")
    lst.set_defaults(func=cmd_passes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except FxCompressError as exc:
        print(f"fxcompress: error: {exc}", file=sys.stderr)
        return 2
    return 0
