"""Wall time and peak memory of every pass (pass + verification + report), for the zoo and scaling benches.

Peak memory is the process's peak resident set (``VmHWM``) above its size when the pass started: the
peak is reset before every pass by writing 5 to ``/proc/self/clear_refs`` (Linux). tracemalloc would
miss tensors (torch allocates them outside Python's allocator); large tensors are ``mmap``-ed, so the
resident set follows them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from fxcompress.instrument import Instrumentation
from fxcompress.report import weight_bytes

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", _STATUS.read_text()).group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak() -> int:
    """Reset the peak resident set to the current one; returns the current resident bytes."""
    _CLEAR_REFS.write_text("5")
    return rss_bytes()


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


class PassCost(Instrumentation):
    """Per pass: ``seconds`` (before_pass -> after_pass), the peak bytes above the start and
    ``peak_x_weights``: (graph weights + that extra) / graph weights, the pass's working set in units of
    the model it rewrites (the issue's target: <= 2.5)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._start = 0.0
        self._rss = 0

    def before_pass(self, index, pass_, gm):
        self._weights = weight_bytes(gm)
        self._rss = reset_peak()
        self._start = time.perf_counter()

    def after_pass(self, index, pass_, gm, result, outputs):
        seconds = time.perf_counter() - self._start
        extra = max(peak_bytes() - self._rss, 0)
        self.rows.append({"pass": pass_.name, "seconds": seconds, "peak_extra_bytes": extra, "weight_bytes": self._weights,
                          "peak_x_weights": 1 + extra / max(self._weights, 1)})
