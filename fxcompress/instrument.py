"""Instrumentation hooks around passes: timing, IR dumps. The per-pass report is one too."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import torch.fx as fx

DUMP_DIR_ENV = "FXCOMPRESS_DUMP_DIR"


class Instrumentation:
    """Base class; override the hooks you need. Hooks observe, they never rewrite the graph."""

    def on_start(self, gm: fx.GraphModule, ctx: Any, outputs: Any) -> None: ...

    def before_pass(self, index: int, pass_: Any, gm: fx.GraphModule) -> None: ...

    def after_run(self, index: int, pass_: Any, gm: fx.GraphModule, result: Any) -> None: ...

    def after_pass(self, index: int, pass_: Any, gm: fx.GraphModule, result: Any, outputs: Any) -> None: ...

    def after_failure(self, index: int, pass_: Any, gm: fx.GraphModule, error: Exception) -> None: ...


class PassTimer(Instrumentation):
    """Wall time of each ``pass.run`` (verification excluded), by pass index."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._start = 0.0

    def before_pass(self, index, pass_, gm):
        self._start = time.perf_counter()

    def after_run(self, index, pass_, gm, result):
        self.seconds[index] = time.perf_counter() - self._start


class IRDumper(Instrumentation):
    """Writes the readable graph code before and after every pass (and after a failure)."""

    def __init__(self, dump_dir: str | os.PathLike):
        self.dump_dir = Path(dump_dir)
        self.dump_dir.mkdir(parents=True, exist_ok=True)

    def _write(self, index: int, pass_: Any, when: str, gm: fx.GraphModule) -> None:
        name = re.sub(r"\W+", "_", pass_.name)
        text = gm.graph.python_code(root_module="self", verbose=True).src
        (self.dump_dir / f"{index:02d}_{name}_{when}.py").write_text(text)

    def before_pass(self, index, pass_, gm):
        self._write(index, pass_, "before", gm)

    def after_run(self, index, pass_, gm, result):
        self._write(index, pass_, "after", gm)

    def after_failure(self, index, pass_, gm, error):
        self._write(index, pass_, "failed", gm)


def dumper_from_env_or(dump_dir: str | os.PathLike | None) -> IRDumper | None:
    path = dump_dir or os.environ.get(DUMP_DIR_ENV)
    return IRDumper(path) if path else None


class PassProgress(Instrumentation):
    """Advances a progress bar (see :func:`fxcompress.quiet.progress_bar`) by one step per pass."""

    def __init__(self, bar: Any):
        self.bar = bar

    def on_start(self, gm, ctx, outputs):
        self.bar.set_postfix_str("measuring the input model")

    def before_pass(self, index, pass_, gm):
        self.bar.set_postfix_str(f"{pass_.name}: running")

    def after_run(self, index, pass_, gm, result):
        self.bar.set_postfix_str(f"{pass_.name}: verifying and measuring")

    def after_pass(self, index, pass_, gm, result, outputs):
        self.bar.update(1)
