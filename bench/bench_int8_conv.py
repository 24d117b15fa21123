"""Static int8 CNNs on the CPU: fp32 eager vs fxcompress int8 vs PyTorch's PT2E x86 path, and digits accuracy.

    python bench/bench_int8_conv.py speed [--size 224] [--batch 8] [--models resnet18,resnet50,...]
    python bench/bench_int8_conv.py digits          # top-1 before/after int8 on scikit-learn digits

``speed``: torchvision ResNet-18/50, MobileNetV2, EfficientNet-B0 with random weights (BN statistics
randomised so folding is not trivial), calibrated on ``--calib`` random batches. Variants, timed
interleaved in one process (medians of rounds, each running every variant once; spread = IQR):
fp32 eager; fxcompress ``[FoldBN(), Int8(mode="static")]`` (engine per conv measured on this machine,
float kept where int8 loses); PT2E (torchao ``prepare_pt2e``/``convert_pt2e`` with
``X86InductorQuantizer``) + ``torch.compile`` (Inductor). Results: ``bench/results/int8_conv_<tag>.{json,md}``.

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
from fxcompress.verify import fidelity

from common import machine_info, write_results


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


def pt2e_x86(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor]):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    model = copy.deepcopy(model)
    for module in model.modules():  # the quantizer's partitions reject in-place activations (same numerics)
        if hasattr(module, "inplace"):
            module.inplace = False
    exported = torch.export.export(model, (example,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    converted = convert_pt2e(prepared)
    return torch.compile(converted)


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


def speed(args) -> None:
    rows, layers = [], {}
    for name in args.models.split(","):
        model = build(name)
        x = torch.randn(args.batch, 3, args.size, args.size)
        calibration = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.calib)]
        started = time.perf_counter()
        scales = fxcompress.calibrate(model, calibration, method=args.method)
        gm = fxcompress.optimize(model, (x,), passes=[FoldBN(), Int8(mode="static", activation_scales=scales)], report=False)
        fx_seconds = time.perf_counter() - started
        variants = {"fp32 eager": model, "fxcompress int8": gm}
        pt2e_seconds = None
        if not args.no_pt2e:
            started = time.perf_counter()
            try:
                compiled = pt2e_x86(model, x, calibration)
                with torch.no_grad():
                    compiled(x)
                variants["PT2E x86 + Inductor"] = compiled
                pt2e_seconds = time.perf_counter() - started
            except Exception as exc:  # report, do not hide: the row says why PT2E is missing
                print(f"{name}: PT2E failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        timing = interleaved(variants, x, args.rounds)
        with torch.no_grad():
            reference = model(x)
            for variant, fn in variants.items():
                median, iqr = timing[variant]
                rows.append({
                    "model": name, "input": f"{args.batch}x3x{args.size}x{args.size}", "variant": variant,
                    "latency_ms": round(median, 1), "iqr_ms": round(iqr, 1),
                    "speedup_vs_fp32": round(timing["fp32 eager"][0] / median, 2),
                    "cosine_vs_fp32": round(fidelity(reference, fn(x)).cosine, 5),
                    "prepare_s": round({"fxcompress int8": fx_seconds, "PT2E x86 + Inductor": pt2e_seconds}.get(variant) or 0.0, 1),
                })
        convs = [n for n in gm.graph.nodes if n.target is torch.ops.fxcompress.int8_conv.default]
        quantize = [n for n in gm.graph.nodes if n.target is torch.ops.fxcompress.quantize_u8.default]
        layers[name] = {"int8_convs": len(convs), "region_entries": len(quantize)}
        print(tabulate([r for r in rows if r["model"] == name], headers="keys", tablefmt="github"), flush=True)
        _write(args, rows, layers)  # after every model: a partial run still leaves its rows


def _write(args, rows: list[dict], layers: dict) -> None:
    notes = {
        "cpu_int8": tuning.device_description(torch.device("cpu")),
        "threads": torch.get_num_threads(), "rounds": args.rounds, "calibration": f"{args.calib} random batches, {args.method}",
        "weights": "random (torchvision constructors, weights=None), BN statistics randomised",
        "shared_machine": "other helpers were running on this 2-core machine; ratios are interleaved in one process",
        "graph": layers,
    }
    table = tabulate(rows, headers="keys", tablefmt="github")
    write_results(f"int8_conv_{args.tag}", {"setup": notes, "rows": rows},
                  table + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in notes.items()))


def digits(args) -> None:
    import distill_digits as dd

    train, test = dd.load_digits_split(0)
    model = dd.train_classifier(dd.DigitsCNN(), train, epochs=args.epochs, seed=0).eval()
    images = train.tensors[0]
    calibration = [images[i:i + 32] for i in range(0, 256, 32)]
    scales = fxcompress.calibrate(model, calibration, method=args.method)
    gm = fxcompress.optimize(model, (images[:32],), passes=[FoldBN(), Int8(mode="static", activation_scales=scales)])
    before, after = dd.accuracy(model, test), dd.accuracy(gm, test)
    details = [{k: row.get(k) for k in ("layer", "op", "impl", "fused", "output_rel_error", "region")}
               for row in gm.report.results["int8"].details if "impl" in row]
    rows = [{"model": "digits CNN (3 conv-BN-ReLU)", "test images": len(test.tensors[1]), "calibration": f"256 train images, {args.method}",
             "top1_fp32": round(before, 2), "top1_int8": round(after, 2), "change_points": round(after - before, 2)}]
    table = tabulate(rows, headers="keys", tablefmt="github") + "\n\nPer layer:\n\n" + tabulate(details, headers="keys", tablefmt="github")
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
    parser.add_argument("--no-pt2e", action="store_true")
    parser.add_argument("--tag", default="cpu", help="machine tag: results of different CPUs go to different files")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    (speed if args.what == "speed" else digits)(args)


if __name__ == "__main__":
    main()
