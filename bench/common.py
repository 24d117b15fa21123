"""Shared benchmark plumbing: machine description and result files (JSON + markdown table).

Results are kept per machine: ``bench/results/<tag>/`` where the tag is ``--tag`` or, by default, the
machine slug (CPU model + the int8-relevant features, e.g. ``amd-epyc-avx512-vnni-bf16``), so figures
from different CPUs never end up in one table.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from fxcompress.tuning import cpu_description, isa_caps

RESULTS = Path(__file__).resolve().parent / "results"


def machine_slug() -> str:
    """``amd-epyc-avx512-vnni-bf16``: the CPU model and the features that decide which int8 kernels are fast."""
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    model, flags = cpu_description()
    words = re.sub(r"\(r\)|\(tm\)|processor|\d+-core|cpu", " ", model.lower())
    features = ["avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "noavx2"]
    features += [name for flag, name in (("avx512_vnni", "vnni"), ("avx_vnni", "avxvnni"), ("avx512_bf16", "bf16"), ("amx_int8", "amx"))
                 if flag in flags]
    capped = " isa-capped" if isa_caps() else ""  # an emulated CPU: never filed with the real one
    return re.sub(r"[^a-z0-9]+", "-", f"{words} {' '.join(features)}{capped}").strip("-")


def add_tag_argument(parser) -> None:
    parser.add_argument("--tag", help="results go to bench/results/<tag>/ (default: this machine's slug, e.g. amd-epyc-avx512-vnni-bf16)")


def results_dir(tag: str | None = None) -> Path:
    return RESULTS / (tag or machine_slug())


def machine_info() -> dict:
    cpu, flags = cpu_description()
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_flags": " ".join(flags),
        **({"isa_caps": isa_caps()} if isa_caps() else {}),
        "machine_slug": machine_slug(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
    except OSError:
        info["commit"] = None
    return info


def write_results(name: str, data: dict, table: str, tag: str | None = None) -> Path:
    """Write ``results/<tag>/<name>.json`` and ``.md`` (machine header + table); ``tag`` defaults to the machine slug."""
    out = results_dir(tag)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, **data}, indent=2, default=str))
    header = ", ".join(f"{k}: {v}" for k, v in machine.items() if v is not None)
    (out / f"{name}.md").write_text(f"# {name}\n\nMachine: {header}\n\n{table}\n")
    return out / f"{name}.md"


def torchao_variants(model: torch.nn.Module) -> dict:
    """torchao's int8 dynamic and weight-only configs applied to copies of ``model`` (none without torchao)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}
    variants = {}
    for name, config in (("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig()), ("torchao int8 weight-only", Int8WeightOnlyConfig())):
        quantized = copy.deepcopy(model)
        quantize_(quantized, config)
        variants[name] = quantized
    return variants
