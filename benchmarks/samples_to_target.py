"""Samples to target from a `layerpipe compare` folder: how many more epochs (so samples) a
pipelined run needs to reach what synchronous training reached.

    python benchmarks/samples_to_target.py docs/results/cnn1d-mnist1d [--metric test_accuracy]
        [--tolerance 0.005]

For each seed, the target is the synchronous run's final value of `--metric` less
`--tolerance` (accuracy: higher is better; a loss metric: the final value plus the
tolerance, lower is better). For every pipelined run of that seed: the first epoch at which
it reaches the target, divided by the first epoch at which the synchronous run did. A run
that never reaches it is reported as "> epochs / sync's" (a lower bound). Prints one row
per (stages, weights): the per-seed factors and their median. The per-epoch curves come
from each run's `history` in results.json; factors are as coarse as one epoch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def first_epoch(history: list[dict], metric: str, target: float, higher: bool) -> int | None:
    for i, h in enumerate(history, 1):
        value = h[metric]
        if (value >= target) if higher else (value <= target):
            return i
    return None


def factors(runs: list[dict], metric: str, tolerance: float) -> dict[tuple[str, str], list[tuple[float, bool]]]:
    """(stages, weights) -> [(factor, reached)] per seed; reached False: a lower bound."""
    higher = "accuracy" in metric
    sync = {r["seed"]: r for r in runs if r["weights"] == "sync"}
    out: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for r in runs:
        ref = sync.get(r["seed"])
        if r["weights"] == "sync" or ref is None:
            continue
        final = ref["history"][-1][metric]
        target = final - tolerance if higher else final + tolerance
        e_sync = first_epoch(ref["history"], metric, target, higher)
        e_pipe = first_epoch(r["history"], metric, target, higher)
        assert e_sync is not None  # sync reaches its own final value at the latest in its last epoch
        key = (",".join(map(str, r["stages"])), r["weights"])
        reached = e_pipe is not None
        out.setdefault(key, []).append(((e_pipe if reached else len(r["history"])) / e_sync, reached))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a `layerpipe compare --out` folder (results.json with sync runs)")
    p.add_argument("--metric", default="test_accuracy", help="a key of each epoch's history (default test_accuracy)")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="how far short of sync's final value still counts as reached (default 0.005)")
    args = p.parse_args()
    path = args.folder / "results.json"
    if not path.is_file():
        print(f"error: no results.json in {args.folder}", file=sys.stderr)
        return 2
    runs = json.loads(path.read_text())["runs"]
    if not any(r["weights"] == "sync" for r in runs):
        print(f"error: {path} has no sync run to take the target from", file=sys.stderr)
        return 2
    if any(args.metric not in h for r in runs for h in r.get("history", [])) or not all(r.get("history") for r in runs):
        print(f"error: not every run of {path} has a per-epoch history with {args.metric!r}", file=sys.stderr)
        return 2
    print(f"target per seed: sync's final {args.metric} {'-' if 'accuracy' in args.metric else '+'} {args.tolerance}; "
          "factor = first epoch reaching it / sync's first epoch (> : not reached, a lower bound)")
    print("| stages | weights | factor per seed | median |")
    print("|---|---|---|---|")
    for (stages, weights), fs in sorted(factors(runs, args.metric, args.tolerance).items(), key=lambda kv: (kv[0][0].count(","), kv[0])):
        cells = ", ".join(f"{'' if ok else '>'}{f:.2f}" for f, ok in fs)
        median = statistics.median(f for f, _ in fs)
        bound = "" if all(ok for _, ok in fs) else " (at least)"
        print(f"| {stages} | {weights} | {cells} | {median:.2f}x{bound} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
