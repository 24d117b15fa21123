"""Runs the int8 Triton kernel checks (tests/int8_kernel_checks.py, tests/int8_conv_kernel_checks.py)
under the Triton interpreter.

``TRITON_INTERPRET`` must be set before Triton and the kernels are imported, and this pytest process
has imported them already, so the checks run in a fresh process; its failures are reported here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _run_interpreted(checks: Path, at_least: int) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(HERE.parent), str(checks)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, output
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= at_least, output


def test_int8_kernels_under_triton_interpreter():
    _run_interpreted(HERE / "int8_kernel_checks.py", at_least=20)


def test_int8_conv_kernels_under_triton_interpreter():
    _run_interpreted(HERE / "int8_conv_kernel_checks.py", at_least=20)
