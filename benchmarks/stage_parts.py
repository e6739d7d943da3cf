"""Where a tick of the single-process engine goes, per stage method (wall time, 1 thread).

    .venv/bin/python benchmarks/stage_parts.py [--model mlp-ln-128] [--weights latest,stash,ema] [--stages 8] [--ticks 800]

A model of `strategy_overhead.py` (default its small LayerNorm MLP) through `Pipeline`; each
`Stage` method and each strategy hook is wrapped with a timer (about 0.5 us per call added),
so the table shows what the engine spends on forward, backward, swap-in/out and the update
next to the strategy's own bookkeeping, in microseconds per tick and per call.
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_overhead import MODELS, batch_for, pipeline_for  # noqa: E402

import layerpipe.engine.stage as stage_module  # noqa: E402
from layerpipe.report.records import environment  # noqa: E402
from layerpipe.weights.ema import UpdateEMA  # noqa: E402
from layerpipe.weights.stash import Stash  # noqa: E402

STAGE_METHODS = ["forward", "backward", "update", "_backward_swapped", "_backward_hooked", "_hidden"]
STRATEGY_METHODS = ["record_forward", "backward_weights", "release", "before_update", "after_update", "history_bytes"]


def instrument(totals: collections.Counter, calls: collections.Counter) -> None:
    def wrap(cls: type, name: str) -> None:
        f = getattr(cls, name)
        key = f"{cls.__name__}.{name}"

        @functools.wraps(f)
        def timed(*a, **k):
            t = time.perf_counter_ns()
            try:
                return f(*a, **k)
            finally:
                totals[key] += time.perf_counter_ns() - t
                calls[key] += 1
        setattr(cls, name, timed)

    for n in STAGE_METHODS:
        wrap(stage_module.Stage, n)
    for n in STRATEGY_METHODS:
        wrap(Stash, n)
        wrap(UpdateEMA, n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp-ln-128", choices=sorted(MODELS))
    p.add_argument("--weights", default="latest,stash,ema")
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--ticks", type=int, default=800)
    args = p.parse_args()
    torch.set_num_threads(1)
    totals: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    instrument(totals, calls)
    env = environment()
    make_model, batch = MODELS[args.model]
    print(f"Command: `python benchmarks/stage_parts.py --model {args.model} --weights {args.weights} --stages {args.stages} --ticks {args.ticks}`  ")
    print(f"Machine: {env['machine']}, {env['cpus']} CPUs, 1 torch thread; torch {env['torch']}; date {env['date']}; "
          f"commit {env['commit']}\n")
    data = [batch_for(args.model, batch) for _ in range(8)]
    for weights in args.weights.split(","):
        torch.manual_seed(0)
        pipe = pipeline_for(args.model, make_model(), args.stages, weights,
                            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
        for i in range(30):
            pipe.step(*data[i % 8])
        totals.clear()
        calls.clear()
        start = time.perf_counter()
        for i in range(args.ticks):
            pipe.step(*data[i % 8])
        print(f"| {weights}: {(time.perf_counter() - start) / args.ticks * 1e3:.2f} ms per tick | us per tick | us per call |")
        print("|---|---:|---:|")
        for key, ns in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"| {key} | {ns / args.ticks / 1e3:.1f} | {ns / calls[key] / 1e3:.1f} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
