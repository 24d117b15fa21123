"""Shared benchmark plumbing: machine description and result files (JSON + markdown table)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
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


def write_results(name: str, data: dict, table: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (machine header + table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, **data}, indent=2, default=str))
    header = ", ".join(f"{k}: {v}" for k, v in machine.items() if v is not None)
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\nMachine: {header}\n\n{table}\n")
    return RESULTS / f"{name}.md"
