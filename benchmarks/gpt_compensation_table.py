"""Tables from the JSON lines of benchmarks/gpt_compensation.py: mean ± sd per configuration.

    PYTHONPATH=src python benchmarks/gpt_compensation_table.py runs/screen.jsonl [--ref TAG]

Groups runs by (tag, weights, stages); prints final validation loss (mean ± sd over seeds),
the relative gap to the reference (default: the best synchronous group), history memory
relative to |W|, and samples-to-target: the samples the run needed to first reach the
reference's final loss (linear interpolation on its validation curve; '>N' if never), and
the reverse: the samples the reference needed to reach this run's final loss (its
sample-equivalent; the lower, the more samples pipelining wastes). References are per stage
count: the best synchronous group with the same `stages`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def samples_to(curve: list[list[float]], target: float) -> float | None:
    prev = None
    for s, v in curve:
        if v <= target:
            if prev is None or prev[1] == v:
                return s
            (s0, v0) = prev
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
        prev = (s, v)
    return None


def fmt(xs: list[float], digits: int = 3) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--ref", default=None, help="tag of the reference group (default: best sync)")
    args = p.parse_args()
    rows = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["tag"], r["weights"], str(r["stages"]))].append(r)
    refs = {}
    for stages in sorted({k[2] for k in groups}):
        sync = {k: v for k, v in groups.items() if k[1] == "sync" and k[2] == stages}
        if args.ref:
            refs[stages] = next(k for k in groups if k[0] == args.ref and k[2] == stages)
        elif sync:
            refs[stages] = min(sync, key=lambda k: statistics.mean(r["final"] for r in sync[k]))
        if stages in refs:
            r = refs[stages]
            print(f"reference at stages={stages}: {r[0]} ({r[1]}), final validation loss {statistics.mean(x['final'] for x in groups[r]):.3f}")
    print("| tag | weights | stages | comp | seeds | val loss | gap vs ref | samples to ref | ref's samples to this loss | history / abs(W) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(groups, key=lambda k: (k[2], statistics.mean(r["final"] for r in groups[k]))):
        if key[2] not in refs:
            continue
        ref_key = refs[key[2]]
        ref = statistics.mean(r["final"] for r in groups[ref_key])
        ref_curve = groups[ref_key][0]["curve"]
        rs = groups[key]
        finals = [r["final"] for r in rs]
        gaps = [100 * (f / ref - 1) for f in finals]
        reach = [samples_to(r["curve"], ref) for r in rs]
        total = rs[0]["curve"][-1][0]
        reach_s = ", ".join(f"{x:.0f}" if x is not None else f">{total}" for x in reach)
        equiv = [samples_to(ref_curve, f) for f in finals]
        first = ref_curve[0][0]  # at or below the reference's first evaluation: only a bound
        equiv_s = ", ".join(("-" if x is None else f"<={first}" if x <= first else f"{x:.0f}") for x in equiv)
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {' '.join(rs[0]['comp']) or 'adamw lr=' + str(rs[0]['lr'])} | {len(rs)} "
            f"| {fmt(finals)} | {fmt(gaps, 1)}% | {reach_s} | {equiv_s} | {statistics.mean(r['history_over_W'] for r in rs):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
