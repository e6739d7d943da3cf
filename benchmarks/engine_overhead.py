"""Where a strategy's per-tick time over `sync` goes: its copies and passes, the backward's
reads of weights that are not the live ones, and the engine's own bookkeeping.

    .venv/bin/python benchmarks/engine_overhead.py [--models cnn1d,mlp-512,mlp-ln-128] [--depths 2,4,8]

Issue 15's per-tick targets (latest 1.03x sync, stash 1.08x, ema 1.05x on
`strategy_overhead.py`'s models) mix what item 1 asks to make near zero (versions, swaps,
release, Python per tick) with memory traffic a strategy cannot do without. Each cell times,
through `Pipeline` (SGD momentum, 1 torch thread, CPU time per tick, interleaved repeats,
medians), the strategies and three timing-only variants whose numbers are wrong on purpose:

  - `stash, no copy`: a version buffer is filled once and never again (`FlatBuffer.copy_from`
    a no-op after its first call): stash without its copy per update;
  - `stash, no copy, no swap`: also, the backward runs on the live weights (no storage swap,
    the version looked up and released as usual): stash's bookkeeping alone;
  - `ema, no swap`: ema's passes and bookkeeping, its backward on the live weights.

Then, over sync's tick: stash's copy = stash - (no copy); the backward's reads of the stashed
version = (no copy) - (no copy, no swap); stash's bookkeeping = (no copy, no swap) - latest;
ema's passes and bookkeeping = (ema, no swap) - latest; ema's backward reads = ema - (no swap).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_overhead import MODELS, TARGETS, batch_for, depth_for, pipeline_for  # noqa: E402

import layerpipe.engine.stage as stage_module  # noqa: E402
from layerpipe.report.records import environment  # noqa: E402
from layerpipe.weights.flat import FlatBuffer  # noqa: E402

COPY, SWAPPED = FlatBuffer.copy_from, stage_module.Stage._backward_swapped


def _copy_once(self: FlatBuffer, tensors) -> None:
    if not getattr(self, "_filled", False):
        COPY(self, tensors)
        self._filled = True


def _backward_live(self: stage_module.Stage, item, grad_output) -> None:
    self.strategy.backward_weights(item.version)
    try:
        stage_module._run_backward(item.output, grad_output, self.is_last)
    finally:
        self.strategy.release(item.version)


#: name: (strategy, skip the copy, skip the swap)
VARIANTS = {"sync": ("sync", False, False), "latest": ("latest", False, False), "stash": ("stash", False, False),
            "stash, no copy": ("stash", True, False), "stash, no copy, no swap": ("stash", True, True),
            "ema": ("ema", False, False), "ema, no swap": ("ema", False, True)}


def tick_ms(model: str, k: int, variant: str, ticks: int) -> float:
    weights, no_copy, no_swap = VARIANTS[variant]
    FlatBuffer.copy_from = _copy_once if no_copy else COPY  # type: ignore[method-assign]
    stage_module.Stage._backward_swapped = _backward_live if no_swap else SWAPPED  # type: ignore[method-assign]
    try:
        make, batch = MODELS[model]
        data = [batch_for(model, batch) for _ in range(8)]
        torch.manual_seed(0)
        pipe = pipeline_for(model, make(), k, weights, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
        for i in range(20):
            pipe.step(*data[i % 8])
        start = time.process_time()
        for i in range(ticks):
            pipe.step(*data[i % 8])
        return (time.process_time() - start) / ticks * 1e3
    finally:
        FlatBuffer.copy_from, stage_module.Stage._backward_swapped = COPY, SWAPPED  # type: ignore[method-assign]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn1d,mlp-512,mlp-ln-128")
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--ticks", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    env = environment()
    print(f"Command: `python benchmarks/engine_overhead.py --models {args.models} --depths {args.depths} "
          f"--ticks {args.ticks} --repeats {args.repeats}`  ")
    print(f"Machine: {env['processor']}, {env['cpus']} CPUs, 1 torch thread; torch {env['torch']}; "
          f"date {env['date']}; commit {env['commit']}\n")
    print("Time per tick over sync's; the parts are differences of those ratios (module docstring).\n")
    print("| model | K | sync ms/tick | latest | stash | stash: copy | stash: backward reads | stash: bookkeeping "
          "| ema | ema: passes + bookkeeping | ema: backward reads |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        make, _ = MODELS[model]
        for k in (int(v) for v in args.depths.split(",")):
            if depth_for(make(), k) < k:  # more stages than layers
                continue
            runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.repeats):
                for v in VARIANTS:
                    runs[v].append(tick_ms(model, k, v, args.ticks))
            med = {v: statistics.median(t) for v, t in runs.items()}
            r = {v: t / med["sync"] for v, t in med.items()}

            def ratio(w: str) -> str:
                return f"{r[w]:.3f}x" + ("" if r[w] <= TARGETS[w] else " (NOT met)")

            cells = [ratio("latest"), ratio("stash"), f"{r['stash'] - r['stash, no copy']:+.3f}",
                     f"{r['stash, no copy'] - r['stash, no copy, no swap']:+.3f}",
                     f"{r['stash, no copy, no swap'] - r['latest']:+.3f}", ratio("ema"),
                     f"{r['ema, no swap'] - r['latest']:+.3f}", f"{r['ema'] - r['ema, no swap']:+.3f}"]
            print(f"| {model} | {k} | {med['sync']:.2f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
