"""SIMULATED time to the synchronous loss: `layerpipe simulate`'s throughput divided by the
measured samples-to-target factor of each asynchronous schedule.

    python benchmarks/time_to_quality.py --factor gpt:pipedream:4=1.4+ --factor gpt:pipedream:8=1.6+ \
        --factor resnet18:layerpipe:4=1.18 --factor resnet18:layerpipe:8=1.33 [--stages 8,16,32] [--microbatches 8,32]

Costs are the two whole-model presets of docs/simulated.md, split evenly over K stages
(ResNet-18: the H200 step time of /work/shared/docs/design.md; the zoo GPT: CPU-measured
proportions). A factor `MODEL:SCHEDULE:K=X` says the asynchronous schedule needs X times
the samples of synchronous training to reach its final loss, measured at K stages (`X+`: at
least X, where the pipelined run never reached that loss and X is its shortfall); a depth
without its own factor takes the one measured at the deepest K below it, marked "(from K=..)"
and to be read as a lower bound (the factor grows with depth wherever it was measured). No
factor at all: the row shows throughput only. The synchronous schedules (GPipe, 1F1B, ZB-H1)
have factor 1 by definition. "time vs 1f1b" = factor x 1F1B's throughput / this throughput:
below 1.00x the schedule reaches the synchronous loss sooner than 1F1B.

`--like-for-like`: the asynchronous schedules update once every M microbatches (gradients
accumulated, `simulate(..., accumulate=M)`), so every schedule makes the same updates of the
same batch; their gradients are then at most ceil(d_max / M) updates stale (d_max = K - 1 for
pipedream, 2 (K - 1) for layerpipe). That is the transformer recipe's setting (at most one
update stale: microbatches of 1 sequence, 4 per update), so its factors belong there; a row
whose staleness exceeds one update, where no factor was measured, shows none.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerpipe.plan.delays import stage_delays  # noqa: E402
from layerpipe.simulate import StageCosts, simulate  # noqa: E402
from layerpipe.simulate.report import fmt_bytes  # noqa: E402

MB = 1e6
PRESETS = {
    "resnet18": dict(forward=2.4e-3, backward=4.8e-3, weight_grad=2.4e-3, update=0.4e-3, transfer=0.1e-3,
                     weight_bytes=44.9 * MB, optimizer_bytes=44.9 * MB, activation_bytes=603 * MB, batch=128),
    "gpt": dict(forward=0.556, backward=1.10, weight_grad=0.55, update=0.0055, transfer=0.0,
                weight_bytes=3.5 * MB, optimizer_bytes=3.5 * MB, activation_bytes=139 * MB, batch=32),
}
SCHEDULES = ("layerpipe", "pipedream", "gpipe", "1f1b", "zb-h1")


def split_evenly(preset: dict, k: int) -> StageCosts:
    """The whole model's costs, 1/K per stage; the transfer stays per boundary."""
    return StageCosts.make(k, forward=preset["forward"] / k, backward=preset["backward"] / k,
                           weight_grad=preset["weight_grad"] / k, update=preset["update"] / k,
                           transfer=preset["transfer"], weight_bytes=preset["weight_bytes"] / k,
                           optimizer_bytes=preset["optimizer_bytes"] / k,
                           activation_bytes=preset["activation_bytes"] / k)


def parse_factor(text: str) -> tuple[str, str, int, float, bool]:
    """MODEL:SCHEDULE:K=X[+] -> (model, schedule, K, X, X is a lower bound)."""
    try:
        where, value = text.split("=")
        model, schedule, k = where.split(":")
        parsed = (model, schedule, int(k), float(value.rstrip("+")), value.endswith("+"))
    except ValueError:
        raise SystemExit(f"error: --factor wants MODEL:SCHEDULE:K=X (e.g. gpt:pipedream:4=1.4), got {text!r}")
    if model not in PRESETS or schedule not in ("layerpipe", "pipedream") or parsed[3] < 1.0 or parsed[2] < 1:
        raise SystemExit(f"error: --factor {text!r}: model one of {', '.join(PRESETS)}, schedule layerpipe or "
                         "pipedream, K >= 1, X >= 1")
    return parsed


def factor_for(factors: dict, model: str, schedule: str, k: int) -> tuple[float | None, str]:
    """(factor, where it comes from) for `model` under `schedule` at K stages; `factors` maps
    (model, schedule, K) -> (X, lower bound)."""
    known = sorted(kk for (m, s, kk) in factors if (m, s) == (model, schedule) and kk <= k)
    if not known:
        return None, "not measured"
    kk = known[-1]
    x, bound = factors[(model, schedule, kk)]
    if kk != k:
        return x, f"from K={kk}, at least"
    return x, "measured, at least" if bound else "measured"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", action="append", default=[], metavar="MODEL:SCHEDULE:K=X")
    p.add_argument("--stages", default="8,16,32")
    p.add_argument("--microbatches", default="8,32")
    p.add_argument("--like-for-like", action="store_true",
                   help="asynchronous schedules update every M microbatches (the synchronous ones' batch)")
    args = p.parse_args()
    factors = {(m, s, k): (x, bound) for m, s, k, x, bound in map(parse_factor, args.factor)}
    stages = [int(v) for v in args.stages.split(",")]
    mbs = [int(v) for v in args.microbatches.split(",")]
    print(f"SIMULATED (layerpipe.simulate), {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
          f"factors: {', '.join(args.factor) or 'none'}"
          + ("; asynchronous schedules update every M microbatches" if args.like_for_like else "") + "\n")
    stale = " | stale updates" if args.like_for_like else ""
    print(f"| model | K | M | schedule | samples/s | samples factor | time to sync loss vs 1f1b (at least, where the factor is) | peak memory per stage{stale} |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * bool(stale))
    for model, preset in PRESETS.items():
        for k in stages:
            costs = split_evenly(preset, k)
            for m in mbs:
                every = m if args.like_for_like else 1
                results = {s: simulate(costs, s, m, accumulate=every) for s in SCHEDULES}
                base = results["1f1b"].throughput
                for s, r in results.items():
                    staleness = ""
                    if s in ("layerpipe", "pipedream"):
                        f, source = factor_for(factors, model, s, k)
                        mem = fmt_bytes(r.peak_memory("ema"))
                        if args.like_for_like:
                            updates = -(-max(stage_delays(k, s)) // every)
                            staleness = f" | {updates}"
                            if updates > 1 and f is not None:  # the factors were measured at one
                                f, source = None, f"not measured ({updates} updates stale)"
                            elif source.startswith("from"):  # another depth at the same staleness
                                source = source.split(",")[0] + ", extrapolated"
                    else:
                        f, source, mem = 1.0, "1 (synchronous)", fmt_bytes(r.peak_memory("sync"))
                        staleness = " | 0" if args.like_for_like else ""
                    time = f"{f * base / r.throughput:.2f}x" if f is not None else "n/a"
                    shown = source if f is None or s not in ("layerpipe", "pipedream") else f"{f:.2f} ({source})"
                    print(f"| {model} | {k} | {m} | {s}{' (ema)' if s in ('layerpipe', 'pipedream') else ''} | "
                          f"{r.throughput * preset['batch']:.4g} | {shown} | {time} | {mem}{staleness} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
