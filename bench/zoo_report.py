"""The zoo runner's table and per-family summary (``bench/results/<machine>/zoo.{json,md}``)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from tabulate import tabulate

from common import write_results

COLUMNS = ("capture", "default", "prune_ratio", "prune_macs", "low_rank", "int8", "mask_equivalence")


def cell(record: dict | None) -> str:
    if record is None:
        return ""
    status = record.get("status")
    if status == "ok" and "capture_s" in record:
        return f"ok {record['capture_s']:.1f} s, dynamic: {', '.join(record['dynamic']) or 'none'}"
    if status == "ok" and "relative_error" in record:
        return f"ok {record['relative_error']:.0e}"
    if status == "ok":
        slowest = max(record["passes"], key=lambda p: p["seconds"], default=None)
        peak = max((p["peak_x_weights"] for p in record["passes"]), default=0)
        return f"ok {record['macs_ratio']:.2f} MACs, {slowest['seconds'] if slowest else 0:.1f} s, {peak:.1f}x mem"
    return f"{status}: {signature(record)[:70]}"


def signature(record: dict) -> str:
    """The failure with its numbers and names blurred, so one cause over many models reads as one line."""
    text = record.get("error", "").splitlines()[0] if record.get("error") else record.get("status", "")
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"\d+", "#", text)


def family_summary(results: dict) -> list[str]:
    by_family: dict[str, dict[str, dict]] = defaultdict(dict)
    for key, records in results.items():
        by_family[key.split("/", 1)[0]][key] = records
    lines = []
    for family, models in sorted(by_family.items()):
        built = {k: r for k, r in models.items() if r.get("build", {}).get("status") == "ok"}
        counts = []
        for variant in COLUMNS:
            tried = [r[variant] for r in built.values() if variant in r]
            if tried:
                counts.append(f"{variant} {sum(t['status'] == 'ok' for t in tried)}/{len(tried)}")
        failures = Counter()
        examples: dict[str, list[str]] = defaultdict(list)
        for key, records in built.items():
            for variant in COLUMNS:
                record = records.get(variant)
                if record and record["status"] != "ok":
                    sig = f"{variant}: {signature(record)[:90]}"
                    failures[sig] += 1
                    examples[sig].append(key.split("/", 1)[1])
        too_large = sorted(k.split("/", 1)[1] for k, r in models.items() if r.get("build", {}).get("status") == "too_large")
        not_built = len(models) - len(built) - len(too_large)
        line = (f"- **{family}**: {len(models)} models" + (f" ({not_built} do not build)" if not_built else "")
                + (f" ({len(too_large)} not run yet, over --max-params: {', '.join(too_large)})" if too_large else "")
                + "; " + ", ".join(counts))
        if failures:
            line += "; failing: " + "; ".join(f"{sig} ({', '.join(sorted(set(examples[sig]))[:4])}{', …' if len(set(examples[sig])) > 4 else ''})"
                                               for sig, _ in failures.most_common(6))
        lines.append(line)
    return lines


def write_zoo(results: dict, tag: str | None = None) -> list[str]:
    rows = []
    for key, records in sorted(results.items()):
        build = records.get("build", {})
        params = build.get("params")
        rows.append([key, f"{params / 1e6:.1f}" if params else build.get("status", ""),
                     *[cell(records.get(c)) for c in COLUMNS]])
    summary = family_summary(results)
    table = tabulate(rows, headers=["model", "params M", *COLUMNS], tablefmt="github")
    failures = [f"- {key} [{variant}] ({record.get('where', '')}): {record.get('error', '')[:400]}"
                for key, records in sorted(results.items()) for variant, record in records.items()
                if record.get("status") not in ("ok", "too_large", None)]
    text = ("All times are wall times on a loaded (shared) machine. capture: one torch.export per model (its wall time, the "
            "dynamic dims kept); every variant runs on a copy of that graph. "
            "Cells: MACs kept (fraction of the input model's), slowest pass wall time (pass + verification + report), "
            "peak resident memory of the worst pass in units of the model's weight bytes; mask_equivalence: relative error.\n\n"
            "## Per family\n\n" + "\n".join(summary) + "\n\n## Models\n\n" + table + "\n\n## Failures\n\n" + "\n".join(failures))
    write_results("zoo", {"models": results, "summary": summary}, text, tag)
    return summary
