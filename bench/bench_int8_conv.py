"""Static int8 CNNs on the CPU: fp32 eager vs fxcompress int8 vs PyTorch's PT2E x86 path, and digits accuracy.

    python bench/bench_int8_conv.py speed [--size 224] [--batch 8] [--threads 1,2] [--models resnet18,resnet50,...]
    python bench/bench_int8_conv.py digits          # top-1 before/after int8 on scikit-learn digits

``speed``: torchvision ResNet-18/50, MobileNetV2, EfficientNet-B0 with random weights (BN statistics
randomised so folding is not trivial), calibrated once on ``--calib`` random batches, then per thread
count (``--threads 1,2``) tuned and timed. Variants, timed interleaved in one process (medians of
rounds, each running every variant once; spread = IQR): fp32 eager; fxcompress ``[FoldBN(),
Int8(mode="static")]`` (engine per conv, then each int8 region and the whole model measured against
float on this machine, float kept where int8 loses); PT2E (torchao ``prepare_pt2e``/``convert_pt2e``
with ``X86InductorQuantizer``, captured with strict export: see ``PT2E_CAPTURE``) + ``torch.compile``
(Inductor with freezing, as the x86 PT2E recipe lowers it; see :func:`compiled`). Fidelity: top-1 agreement with fp32 and relative output error
on the timed batch plus ``--eval-batches`` random ones. Results: ``bench/results/<machine>/int8_conv_<tag>.{json,md}``.

``digits``: the digits CNN of ``distill_digits.py`` trained on the training split, calibrated on 256
training images, test top-1 before and after int8 with the per-layer error of every int8 conv.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import types

import torch
import torch.nn as nn
from tabulate import tabulate

import fxcompress
from fxcompress import tuning
from fxcompress.passes import FoldBN, Int8

from common import write_results


def torchvision_models():
    """``torchvision.models``; where torchvision's C extension does not match this torch build (the PyPI
    wheel next to the CPU torch), its pure-Python model constructors are loaded without the package init."""
    try:
        import torchvision.models as models
    except (RuntimeError, OSError):
        spec = importlib.util.find_spec("torchvision")
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = package
        import torchvision.models as models
    return models


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision_models(), name)(weights=None).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


PT2E_CAPTURE = (
    "torch.export.export(strict=True): non-strict export (the default) leaves no source_fn_stack, so torchao's "
    "get_source_partitions groups by nn_module_stack and puts every call of one module into one partition; "
    "torchvision's BasicBlock/Bottleneck call one self.relu two or three times, and X86InductorQuantizer's "
    "conv+add+relu annotation raises 'Input partition has more than one output node' (pytorch/ao#4478, fixed "
    "for linears only by pytorch/ao#4480). Strict (Dynamo) export records each call as its own partition."
)


def pt2e_x86(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    """The PT2E-converted model (torchao ``prepare_pt2e``/``convert_pt2e``, ``X86InductorQuantizer``);
    compile it per thread count (:func:`compiled`)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    model = copy.deepcopy(model)
    for module in model.modules():  # the quantizer's partitions reject in-place activations (same numerics)
        if hasattr(module, "inplace"):
            module.inplace = False
    exported = torch.export.export(model, (example,), strict=True).module()  # see PT2E_CAPTURE
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_pt2e(prepared)


def compiled(converted: nn.Module, x: torch.Tensor):
    """``torch.compile`` (Inductor) as the x86 PT2E recipe lowers it: with freezing (weights constant-folded
    and prepacked for oneDNN's qconv), compiled once for every thread count: ``cpp.dynamic_threads`` makes
    Inductor's C++ kernels read the OpenMP thread count at run time instead of fixing it at code generation
    (Inductor notes a slight cost at one thread; compiling per thread count doubles the bench's time)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(freezing=True, **{"cpp.dynamic_threads": True}):
        fn = torch.compile(converted)
        with torch.no_grad():
            fn(x)
    return fn


def interleaved(variants: dict, x: torch.Tensor, rounds: int) -> dict[str, tuple[float, float]]:
    """(median ms, IQR ms) per variant over ``rounds`` rounds, each running every variant once."""
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn(x)
        for _ in range(rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, t in times.items():
        q1, _, q3 = statistics.quantiles(t, n=4) if len(t) >= 4 else (min(t), 0, max(t))
        out[name] = (statistics.median(t), q3 - q1)
    return out


def agreement(model: nn.Module, fn, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(top-1 agreement with fp32 in %, ‖y − y_fp32‖ / ‖y_fp32‖) over ``batches``."""
    with torch.no_grad():
        reference = torch.cat([model(b) for b in batches])
        output = torch.cat([fn(b) for b in batches])
    same = (reference.argmax(-1) == output.argmax(-1)).float().mean().item() * 100
    return same, ((output - reference).norm() / reference.norm()).item()


def speed(args) -> None:
    rows, layers, problems, begun = [], {}, {}, time.perf_counter()
    for name in args.models.split(","):
        model = build(name)
        x = torch.randn(args.batch, 3, args.size, args.size)
        calibration = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.calib)]
        held_out = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.eval_batches)]
        started = time.perf_counter()
        scales = fxcompress.calibrate(model, calibration, method=args.method)
        calibrate_seconds = time.perf_counter() - started
        pt2e, pt2e_seconds = None, 0.0
        thread_counts = [int(t) for t in args.threads.split(",")]
        if not args.no_pt2e:
            started = time.perf_counter()
            torch.set_num_threads(max(thread_counts))
            try:
                pt2e = compiled(pt2e_x86(model, x, calibration), x)
            except Exception as exc:  # report, do not hide: the results say why PT2E is missing
                problems[name] = f"PT2E failed: {type(exc).__name__}: {exc}"
                print(f"{name}: {problems[name]}", file=sys.stderr)
            pt2e_seconds = time.perf_counter() - started
        for threads in thread_counts:
            torch.set_num_threads(threads)
            started = time.perf_counter()
            gm = fxcompress.optimize(model, (x,), passes=[FoldBN(), Int8(mode="static", activation_scales=scales)], report=False)
            prepare = {"fxcompress int8": calibrate_seconds + time.perf_counter() - started}
            variants = {"fp32 eager": model, "fxcompress int8": gm}
            if pt2e is not None:
                variants["PT2E x86 + Inductor"] = pt2e
                prepare["PT2E x86 + Inductor"] = pt2e_seconds
            timing = interleaved(variants, x, args.rounds)
            for variant, fn in variants.items():
                median, iqr = timing[variant]
                top1, rel_error = agreement(model, fn, [x, *held_out])
                rows.append({
                    "model": name, "input": f"{args.batch}x3x{args.size}x{args.size}", "threads": threads, "variant": variant,
                    "latency_ms": round(median, 1), "iqr_ms": round(iqr, 1),
                    "speedup_vs_fp32": round(timing["fp32 eager"][0] / median, 2),
                    "top1_agree_%": round(top1, 1), "rel_error": f"{rel_error:.2g}",
                    "prepare_s": round(prepare.get(variant, 0.0), 1),
                })
            layers[f"{name} ({threads} threads)"] = _graph_summary(gm)
            print(tabulate([r for r in rows if r["model"] == name and r["threads"] == threads], headers="keys", tablefmt="github"),
                  flush=True)
            _write(args, rows, layers, problems, time.perf_counter() - begun)  # after every model: a partial run still leaves its rows


def _graph_summary(gm) -> dict:
    """What the int8 pass made of the model: int8 convs, regions, regions kept float and the whole-model verdict."""
    ops = torch.ops.fxcompress
    details = gm.report.results["int8"].details
    decisions = [row for row in details if "decision" in row]
    return {
        "int8_convs": sum(n.target is ops.int8_conv.default for n in gm.graph.nodes),
        "region_entries": sum(n.target is ops.quantize_u8.default for n in gm.graph.nodes),
        "regions_int8": sum("ends_at" in row for row in decisions),
        "regions_kept_float": sum(row.get("region") == "kept float" for row in decisions),
        "whole_model": next((row["decision"] for row in decisions if row.get("region") == "whole model"), "not measured"),
    }


def _write(args, rows: list[dict], layers: dict, problems: dict, wall_seconds: float) -> None:
    notes = {
        "cpu_int8": tuning.device_description(torch.device("cpu")).rsplit(" ", 2)[0],
        "threads": args.threads, "rounds": args.rounds, "calibration": f"{args.calib} random batches, {args.method}",
        "fidelity": f"top-1 agreement and relative output error vs fp32 on {1 + args.eval_batches} random batches",
        "weights": "random (torchvision constructors, weights=None), BN statistics randomised",
        "pt2e_capture": PT2E_CAPTURE,
        "load": "check load_average in the header: ratios are interleaved in one process, absolute times need an idle machine",
        "graph": layers,
        "bench_wall_s": round(wall_seconds),
        **({"pt2e_problems": problems} if problems else {}),
    }
    table = tabulate(rows, headers="keys", tablefmt="github")
    write_results(f"int8_conv_{args.tag}", {"setup": notes, "rows": rows},
                  table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in notes.items()))


def digits(args) -> None:
    """Digits accuracy of the int8 scheme (``allow_slower=True``: every conv int8 even where float is faster on
    8×8 images) and of the default, measured lowering."""
    import distill_digits as dd

    train, test = dd.load_digits_split(0)
    model = dd.train_classifier(dd.DigitsCNN(), train, epochs=args.epochs, seed=0).eval()
    images = train.tensors[0]
    calibration = [images[i:i + 32] for i in range(0, 256, 32)]
    scales = fxcompress.calibrate(model, calibration, method=args.method)
    before = dd.accuracy(model, test)
    rows, details = [], []
    for variant, options in (("int8, every conv (allow_slower=True)", {"allow_slower": True}), ("int8, measured (default)", {})):
        gm = fxcompress.optimize(model, (images[:32],), passes=[FoldBN(), Int8(mode="static", activation_scales=scales, **options)],
                                 report=False)
        after = dd.accuracy(gm, test)
        top1, rel_error = agreement(model, gm, [test.tensors[0]])
        rows.append({"model": "digits CNN (3 conv-BN-ReLU)", "variant": variant, "test images": len(test.tensors[1]),
                     "calibration": f"256 train images, {args.method}", "int8_convs": _graph_summary(gm)["int8_convs"],
                     "top1_fp32": round(before, 2), "top1_int8": round(after, 2), "change_points": round(after - before, 2),
                     "top1_agree_%": round(top1, 2), "rel_error": f"{rel_error:.2g}"})
        details = details or [{k: row.get(k) for k in ("layer", "op", "impl", "fused", "output_rel_error", "region")}
                              for row in gm.report.results["int8"].details if "weight_shape" in row]
    table = tabulate(rows, headers="keys", tablefmt="github") + "\n\nPer layer (every conv int8):\n\n" + tabulate(
        details, headers="keys", tablefmt="github")
    write_results(f"int8_conv_digits_{args.tag}", {"cpu_int8": tuning.device_description(torch.device("cpu")), "rows": rows,
                                                   "layers": details}, table)
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "digits"))
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,efficientnet_b0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calib", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--method", default="minmax", choices=("minmax", "percentile", "mse"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts, each tuned and timed")
    parser.add_argument("--eval-batches", type=int, default=3, help="extra random batches for the top-1 agreement")
    parser.add_argument("--no-pt2e", action="store_true")
    parser.add_argument("--tag", default="cpu", help="machine tag: results of different CPUs go to different files")
    args = parser.parse_args()
    (speed if args.what == "speed" else digits)(args)


if __name__ == "__main__":
    main()
