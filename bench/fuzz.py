"""Fuzz campaign: N random architectures (grammar: tests/fuzz_models.py), every property of tests/fuzz_checks.py.

    python bench/fuzz.py --examples 300 [--seed 0]

Writes bench/results/fuzz.{json,md}: how many models were tried, how many failed each property, and
the architecture and message of each failure (target: zero failures).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results  # noqa: E402
from tests.fuzz_checks import check_fold_bn, check_low_rank_full_rank, check_prune  # noqa: E402
from tests.fuzz_strategies import random_nets  # noqa: E402

CHECKS = {
    "fold_bn exact + dynamic batch": lambda model, ratio, seed: check_fold_bn(model),
    "prune mask equivalence + dynamic batch": check_prune,
    "low_rank full rank exact + dynamic batch": lambda model, ratio, seed: check_low_rank_full_rank(model),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tried, failures, started = 0, [], time.perf_counter()

    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(model=random_nets(), ratio=st.floats(0.1, 0.8), seed=st.integers(0, 1000))
    def campaign(model, ratio, seed):
        nonlocal tried
        tried += 1
        for name, check in CHECKS.items():
            try:
                check(model, ratio, seed)
            except Exception as exc:  # record and go on: the campaign counts every failure
                failures.append({"check": name, "model": repr(model.specs), "stem": model.stem[0].out_channels,
                                 "flatten_head": model.flatten_head, "ratio": ratio, "seed": seed,
                                 "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                 "where": traceback.format_exc().splitlines()[-3:]})

    hypothesis_seed(args.seed)(campaign)()
    seconds = time.perf_counter() - started
    rows = [[name, tried, sum(f["check"] == name for f in failures)] for name in CHECKS]
    table = tabulate(rows, headers=["property", "models tried", "failed"], tablefmt="github")
    table += f"\n\n{tried} random models, {len(failures)} failures, {seconds:.0f} s, seed {args.seed}."
    if failures:
        table += "\n\n" + tabulate([[f["check"], f["error"][:120], f["model"][:160]] for f in failures[:20]],
                                   headers=["property", "error", "model"], tablefmt="github")
    path = write_results("fuzz", {"examples": tried, "failures": failures, "seconds": seconds, "seed": args.seed}, table)
    print(table)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
