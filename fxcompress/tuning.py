"""Measured lowering choices: the candidate registry, the one timing helper, and the per-machine cache.

A *family* is one operation with several implementations that compute it within a fidelity contract
(e.g. ``"int8_linear_dynamic"``: float ``aten.linear``, ``torch._int_mm`` + quantize/dequantize, the
quantized engines' prepacked dynamic linear, ...). Passes register :class:`Candidate` s per family;
:func:`choose` times the available ones at the node's real shapes on the current device
(:func:`compare`, interleaved) and picks the fastest, or, with ``tune=False``, applies the family's
static rule (:func:`static_choice`, documented per CPU feature in ARCHITECTURE.md). Timings are cached
per machine (:func:`machine_key`: CPU model + int8-relevant flags + threads, or CUDA name +
capability; torch version) in ``$FXCOMPRESS_CACHE_DIR`` or ``$XDG_CACHE_HOME/fxcompress``
(``~/.cache/fxcompress``), so a second run on the same machine does not re-time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
"""The /proc/cpuinfo flags that decide which int8/bf16 kernels are fast (part of the machine key)."""


# --- the machine ----------------------------------------------------------------------------------

ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")
"""Environment variables that cap the instruction sets ATen, oneDNN and FBGEMM use (e.g. to run as an AVX2-only CPU)."""


def isa_caps() -> str:
    """The ISA caps set in the environment, ``"NAME=value ..."`` ("" when none)."""
    return " ".join(f"{name}={os.environ[name]}" for name in ISA_CAP_VARIABLES if os.environ.get(name))


@functools.lru_cache(maxsize=1)
def _cpu_as_read() -> tuple[str, frozenset[str]]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), None)
    if flags is None:  # not Linux x86: fall back to what ATen's dispatcher detected ("AVX2", "AVX512", ...)
        capability = torch.backends.cpu.get_cpu_capability().lower()
        flags = {"avx2"} if capability.startswith("avx") else set()
        flags |= {"avx512f"} if capability.startswith("avx512") else set()
    return model or platform.processor() or platform.machine(), frozenset(flags)


def cpu_description() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the int8-relevant flags it has) from /proc/cpuinfo; torch's capability elsewhere.

    Where every ISA cap set (:data:`ISA_CAP_VARIABLES`) is AVX2, only ``avx2`` counts: the kernels run
    as on an AVX2-only CPU, and timings cached without the caps must not be reused."""
    model, flags = _cpu_as_read()
    caps = [os.environ[name].lower() for name in ISA_CAP_VARIABLES if os.environ.get(name)]
    if caps and all(cap.startswith("avx2") for cap in caps):
        flags &= {"avx2"}
    return model, tuple(f for f in INT8_CPU_FLAGS if f in flags)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    model, flags = cpu_description()
    return f"{model} [{' '.join(flags)}] {torch.get_num_threads()} threads"


def machine_key(device: torch.device) -> str:
    """What a cached timing is only valid for: the device, its capabilities (and ISA caps), threads and torch version."""
    caps = isa_caps() if device.type == "cpu" else ""
    return f"{device_description(device)} | torch {torch.__version__}" + (f" | {caps}" if caps else "")


# --- timing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """One callable's time per call: median, inter-quartile range and minimum over interleaved blocks (ms)."""

    median_ms: float
    iqr_ms: float
    min_ms: float

    def __str__(self) -> str:
        return f"{self.median_ms:.3g}±{self.iqr_ms / 2:.2g} ms"


def _summary(samples: list[float]) -> Timing:
    if len(samples) < 4:
        return Timing(statistics.median(samples), max(samples) - min(samples), min(samples))
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return Timing(statistics.median(samples), q3 - q1, min(samples))


def compare(fns: dict[str, Callable[[], Any]], device: torch.device | str = "cpu", min_run_time: float = 0.2,
            rounds: int = 7) -> dict[str, Timing]:
    """Time every callable, interleaved: ``rounds`` rounds, each running every callable once for a block.

    The one timing helper of the project (report, passes, benches). CPU: each block is one
    ``torch.utils.benchmark.Timer.timeit(number)`` with ``number`` sized so that all blocks together
    take about ``min_run_time`` seconds per callable; interleaving makes load from other processes hit
    every variant alike. CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flush) per callable and round.
    """
    device = torch.device(device)
    if not fns:
        return {}
    with torch.no_grad():
        for fn in fns.values():  # warm-up: lazy initialisation (prepacking, autotuning) is not timed
            fn()
        if device.type == "cuda":
            from triton.testing import do_bench  # Triton is optional: imported on CUDA only

            samples = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    samples[name].append(float(do_bench(fn, warmup=5, rep=max(1, int(1e3 * min_run_time / rounds)))))
            return {name: _summary(s) for name, s in samples.items()}
        from torch.utils.benchmark import Timer  # here: imported on the first timing, not with fxcompress

        timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for name, fn in fns.items()}
        numbers = {name: _block_size(timer, min_run_time / rounds) for name, timer in timers.items()}
        samples = {name: [] for name in fns}
        for _ in range(rounds):
            for name, timer in timers.items():
                samples[name].append(timer.timeit(numbers[name]).median * 1e3)
    return {name: _summary(s) for name, s in samples.items()}


def _block_size(timer, block_seconds: float) -> int:
    once = timer.timeit(1).median
    return max(1, min(1000, int(block_seconds / max(once, 1e-7))))


def speedup_is_measurable(before: Timing, after: Timing) -> bool:
    """False when the difference of the medians is within the measurement spread (noise)."""
    return abs(before.median_ms - after.median_ms) > max(before.iqr_ms, after.iqr_ms)


# --- candidates and the choice ----------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One implementation of a family. ``run(problem)`` computes it (timed and checked for fidelity);
    ``available(problem)`` says whether it exists here (engine compiled in, device, dtype)."""

    name: str
    run: Callable[[Any], Any]
    available: Callable[[Any], bool] = lambda problem: True


@dataclass(frozen=True)
class Family:
    """The candidates of one operation and the rule used without measurement (``tune=False``)."""

    name: str
    candidates: dict[str, Candidate] = field(default_factory=dict)
    static_rule: Callable[[Any, list[str]], str] | None = None


_FAMILIES: dict[str, Family] = {}


def family(name: str, static_rule: Callable[[Any, list[str]], str] | None = None) -> Family:
    """The family ``name`` (created on first use; a ``static_rule`` given later replaces the first)."""
    if name not in _FAMILIES:
        _FAMILIES[name] = Family(name)
    if static_rule is not None:
        _FAMILIES[name] = Family(name, _FAMILIES[name].candidates, static_rule)
    return _FAMILIES[name]


def register_candidate(family_name: str, candidate: Candidate) -> Candidate:
    family(family_name).candidates[candidate.name] = candidate
    return candidate


@dataclass(frozen=True)
class Choice:
    """The implementation chosen for one problem, why, and the timings it was chosen from (ms)."""

    impl: str
    reason: str
    timings: dict[str, Timing] = field(default_factory=dict)
    cached: bool = False

    def timings_text(self) -> str:
        return ", ".join(f"{name} {t}" for name, t in sorted(self.timings.items(), key=lambda kv: kv[1].median_ms))


def static_choice(family_name: str, problem: Any, names: list[str]) -> Choice:
    """The family's rule for this device (``tune=False``); the first of ``names`` where it names none of them."""
    rule = family(family_name).static_rule
    impl = rule(problem, names) if rule is not None else names[0]
    impl = impl if impl in names else names[0]
    return Choice(impl, f"static rule for {device_description(problem.device)} (tune=False)")


def choose(family_name: str, problem: Any, names: list[str], key: dict, tune: bool = True,
           min_run_time: float = 0.1, baseline: str = "float",
           timed: Callable[[Candidate], Callable[[], Any]] | None = None) -> Choice:
    """The fastest of the candidates ``names`` of ``family_name`` on ``problem`` (measured or cached).

    The ``baseline`` (the unrewritten original) is kept unless the fastest candidate beats it by more
    than the measurement spread: on a noisy machine a lucky sample never replaces the original.

    ``names`` are the candidates that exist here and passed the caller's fidelity contract; ``key``
    describes the problem for the cache (op, dtypes, shapes, options) besides the machine. ``timed``
    gives the callable timed for a candidate (default: its ``run`` on ``problem``), e.g. one that reads
    a different copy of the weights each call; the ``key`` must say how it differs.
    """
    if len(names) == 1:
        return Choice(names[0], "the only candidate allowed")
    if not tune:
        return static_choice(family_name, problem, names)
    cache = TimingCache.default()
    entry_key = json.dumps({"machine": machine_key(problem.device), "family": family_name, **key}, sort_keys=True, default=str)
    timings = cache.get(entry_key, names)
    cached = timings is not None
    if not cached:
        candidates = family(family_name).candidates
        timed = timed or (lambda candidate: functools.partial(candidate.run, problem))
        timings = compare({n: timed(candidates[n]) for n in names}, problem.device, min_run_time)
        cache.put(entry_key, timings)
    best = min(names, key=lambda n: timings[n].median_ms)
    if baseline in names and best != baseline and not speedup_is_measurable(timings[baseline], timings[best]):
        return Choice(baseline, f"no measurable gain over {baseline} on {device_description(problem.device)}", timings, cached)
    return Choice(best, f"measured fastest on {device_description(problem.device)}", timings, cached)


# --- the cache ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get("FXCOMPRESS_CACHE_DIR"):
        return Path(os.environ["FXCOMPRESS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxcompress"


class TimingCache:
    """``kernel_timings.json``: entry key (machine + family + problem) → {candidate: Timing}."""

    _lock = threading.Lock()

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def default(cls) -> "TimingCache":
        return cls(cache_dir() / "kernel_timings.json")

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str, names: list[str]) -> dict[str, Timing] | None:
        entry = self._load().get(_digest(key))
        if entry is None or not set(names) <= set(entry["timings"]):
            return None
        return {n: Timing(**entry["timings"][n]) for n in names}

    def put(self, key: str, timings: dict[str, Timing]) -> None:
        with self._lock:
            data = self._load()
            data[_digest(key)] = {"key": key, "timings": {n: vars(t) for n, t in timings.items()}}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1))
                tmp.replace(self.path)
            except OSError:  # a read-only home: timings are simply not reused
                pass


def _digest(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()
