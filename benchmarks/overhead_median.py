"""Median, cell by cell, of several `strategy_overhead.py` reports (single quiet runs move by
up to 8-15% per cell on a shared 2-core VM, so one run decides little).

    .venv/bin/python benchmarks/overhead_median.py benchmarks/results/strategy-overhead-runs/*.md
"""
from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

TARGETS = {"latest": 1.03, "stash": 1.08, "ema": 1.05}


def cells(path: Path) -> dict[tuple[str, str, str], float]:
    """(model, K, strategy) -> time relative to sync, from a report's main table."""
    lines = path.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model | K |"))
    names = [c.strip() for c in re.split(r"(?<!\\)\|", header.strip().strip("|"))]  # `\|` is inside a name
    out = {}
    for line in lines:
        parts = [c.strip() for c in line.strip("|").split("|")]
        if len(parts) != len(names) or not re.fullmatch(r"\d+", parts[1]):
            continue
        for name, value in zip(names, parts):
            if name.endswith(" time") and value.endswith("x"):
                out[(parts[0], parts[1], name[: -len(" time")])] = float(value[:-1])
    return out


def main(paths: list[str]) -> int:
    runs = [cells(Path(p)) for p in paths]
    keys = sorted({(m, k) for run in runs for (m, k, _) in run}, key=lambda mk: (mk[0], int(mk[1])))
    print(f"Median over {len(runs)} runs ({', '.join(Path(p).name for p in paths)}), time per tick / sync:\n")
    print("| model | K | " + " | ".join(f"{s} (runs)" for s in TARGETS) + " |")
    print("|---|---|" + "---|" * len(TARGETS))
    met: dict[str, int] = {s: 0 for s in TARGETS}
    for model, k in keys:
        row = []
        for s, target in TARGETS.items():
            values = [run[(model, k, s)] for run in runs if (model, k, s) in run]
            median = statistics.median(values)
            ok = median <= target
            met[s] += ok
            row.append(f"{median:.3f}x {'met' if ok else 'NOT met'} ({', '.join(f'{v:.3f}' for v in values)})")
        print(f"| {model} | {k} | " + " | ".join(row) + " |")
    print("\nTargets met by the medians: " + ", ".join(f"{s} {met[s]} of {len(keys)}" for s in TARGETS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
