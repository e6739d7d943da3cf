"""One table across `layerpipe compare` result folders: accuracy per strategy and depth, the
paired ema - stash difference, and the weight history each holds.

    .venv/bin/python benchmarks/results_summary.py docs/results/cnn1d-mnist1d docs/results/snn-mnist1d ...
    .venv/bin/python benchmarks/results_summary.py --metric test_loss docs/results/gpt-text-2ep ...

Reads each folder's results.json (written by `layerpipe compare`); nothing is retrained.
"ema - stash" pairs the runs of the same seed (same data order and initialisation) and gives
the mean difference and its standard error over seeds; "vs sync" is the mean accuracy minus
sync's, the quantity the issue-5 targets bound (within 0.5 and 1 point).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def summarize(folder: Path, metric: str = "test_accuracy") -> list[str]:
    data = json.loads((folder / "results.json").read_text())
    runs = {tuple(r["key"]): r for r in data["runs"]}
    depths = list(dict.fromkeys(k[0] for k in runs))
    rows = []
    for depth in depths:
        seeds = sorted({k[2] for k in runs if k[0] == depth})
        scale = 100 if metric == "test_accuracy" else 1  # accuracy in %, losses as they are
        acc = {w: [scale * runs[(depth, w, s)][metric] for s in seeds]
               for w in ("sync", "stash", "ema", "latest") if (depth, w, seeds[0]) in runs}
        if not {"sync", "stash", "ema"} <= set(acc):
            continue
        piped = runs[(depth, "stash", seeds[0])]
        diff, se = mean_se([e - s for e, s in zip(acc["ema"], acc["stash"])])
        sync = statistics.mean(acc["sync"])
        bytes_of = {w: max(runs[(depth, w, s)]["weight_history_bytes"] for s in seeds) / piped["parameter_bytes"]
                    for w in ("stash", "ema")}
        f = 2 if metric == "test_accuracy" else 3  # decimals
        means = " | ".join(f"{statistics.mean(acc[w]):.{f}f}" if w in acc else "-" for w in ("sync", "stash", "ema", "latest"))
        rows.append(
            f"| {folder.name} | {len(piped['stages'])} | {','.join(map(str, piped['delays']))} | {len(seeds)} | {means} | "
            f"{diff:+.{f}f} ± {se:.{f}f} | {statistics.mean(acc['stash']) - sync:+.{f}f} / {statistics.mean(acc['ema']) - sync:+.{f}f} | "
            f"{bytes_of['ema']:.2f} / {bytes_of['stash']:.2f} |"
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="folders written by `layerpipe compare --out`")
    p.add_argument("--metric", default="test_accuracy", choices=("test_accuracy", "test_loss"),
                   help="test accuracy in %% (default) or test / validation loss")
    args = p.parse_args()
    missing = [str(f) for f in args.folders if not (f / "results.json").is_file()]
    if missing:
        print(f"results_summary: no results.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    print("| results | K | delays | seeds | sync | stash | ema | latest | ema - stash (paired, ± se) "
          "| stash / ema vs sync | history ema / stash (x \\|W\\|) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        print("\n".join(summarize(folder, args.metric)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
