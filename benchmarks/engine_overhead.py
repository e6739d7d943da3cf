"""The engine's own per-tick overhead, apart from the arithmetic a weight strategy must do.

    .venv/bin/python benchmarks/engine_overhead.py [--models cnn1d,mlp-512,mlp-ln-128] [--depths 2,4,8]

Issue 15's per-tick targets (latest 1.03x sync, stash 1.08x, ema 1.05x on
`strategy_overhead.py`'s models) mix two things: the engine's bookkeeping (versions, swaps,
hooks, Python per tick), which item 1 asks to make near zero, and the memory passes a strategy
cannot do without: `stash` copies a delayed stage's weights once per update, `ema` makes two
in-place passes over its buffer (`weights/ema.py`). This script times each tick through
`Pipeline` (SGD momentum, 1 torch thread, CPU time, as `tick_time.py`) and, in the same ticks,
the strategy's `before_update`, `after_update` and `backward_weights` (the passes; a timer
around each call, about 0.5 us), interleaved over repeats; per cell the medians of

  - time / sync: what `strategy_overhead.py` reports;
  - passes / sync: the strategy's arithmetic;
  - (time - passes) / sync: the engine's own overhead (1.00x: none).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_overhead import MODELS, TARGETS, batch_for  # noqa: E402

from layerpipe import Pipeline  # noqa: E402
from layerpipe.report.records import environment  # noqa: E402
from layerpipe.weights.ema import UpdateEMA  # noqa: E402
from layerpipe.weights.stash import Stash  # noqa: E402

PASSES = ("before_update", "after_update", "backward_weights")
SPENT = [0.0]  # CPU seconds inside the timed strategy methods


def instrument() -> None:
    for cls in (Stash, UpdateEMA):
        for name in PASSES:
            f = getattr(cls, name)

            @functools.wraps(f)
            def timed(*a, _f=f, **k):
                t = time.process_time()
                try:
                    return _f(*a, **k)
                finally:
                    SPENT[0] += time.process_time() - t
            setattr(cls, name, timed)


def one(model: str, k: int, weights: str, ticks: int) -> tuple[float, float]:
    """(ms per tick, ms of strategy passes per tick)."""
    make, batch = MODELS[model]
    data = [batch_for(model, batch) for _ in range(8)]
    torch.manual_seed(0)
    pipe = Pipeline(make(), stages=k, weights=weights, loss_fn=F.cross_entropy,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
    for i in range(20):
        pipe.step(*data[i % 8])
    SPENT[0] = 0.0
    start = time.process_time()
    for i in range(ticks):
        pipe.step(*data[i % 8])
    return (time.process_time() - start) / ticks * 1e3, SPENT[0] / ticks * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn1d,mlp-512,mlp-ln-128")
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--ticks", type=int, default=120)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    instrument()
    env = environment()
    print(f"Command: `python benchmarks/engine_overhead.py --models {args.models} --depths {args.depths} "
          f"--ticks {args.ticks} --repeats {args.repeats}`  ")
    print(f"Machine: {env['processor']}, {env['cpus']} CPUs, 1 torch thread; torch {env['torch']}; "
          f"date {env['date']}; commit {env['commit']}\n")
    print("| model | K | sync ms/tick | latest | stash | stash passes | stash engine | ema | ema passes | ema engine |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        for k in (int(v) for v in args.depths.split(",")):
            make, _ = MODELS[model]
            if k > len(make()):
                continue
            runs: dict[str, list[tuple[float, float]]] = {}
            for _ in range(args.repeats):
                for w in ("sync", "latest", "stash", "ema"):
                    runs.setdefault(w, []).append(one(model, k, w, args.ticks))
            sync = statistics.median(t for t, _ in runs["sync"])

            def cell(w: str) -> list[str]:
                t = statistics.median(t for t, _ in runs[w])
                passes = statistics.median(s for _, s in runs[w])
                engine = statistics.median(t - s for t, s in runs[w])
                mark = "" if t / sync <= TARGETS[w] else " (NOT met)"
                out = [f"{t / sync:.3f}x{mark}"]
                if w != "latest":
                    out += [f"{passes / sync:.3f}", f"{engine / sync:.3f}x"]
                return out

            print(f"| {model} | {k} | {sync:.2f} | " + " | ".join(cell("latest") + cell("stash") + cell("ema")) + " |")
    print("\npasses: the strategy's before_update, after_update and backward_weights (copies, EMA passes) "
          "as a share of sync's tick; engine: the tick without them, over sync's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
