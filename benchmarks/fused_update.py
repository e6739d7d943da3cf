"""Microbenchmark: one stage's update, unfused (the strategy's hooks around torch.optim.SGD's
step) against `fused_update` (`layerpipe.engine.fused`: the same work as one compiled loop per
tensor), side by side, per strategy and stage size.

    python benchmarks/fused_update.py [--mib 1,4,16] [--updates 20] [--repeats 5]

One stage of 4 square weight matrices and their biases (`--mib` MiB of weights), SGD with
momentum 0.9, one torch thread, CPU time. Before each update a sweep over a 64 MB buffer stands
for the forward and backward between two updates (it evicts the caches, as a real tick does),
and is timed alone as `base`; the table shows ms per update with the sweep taken off (and a
last line the fixed cost of a fused call, on a tiny stage):

- sync: the optimizer step alone (torch's default per-tensor foreach step; `sync fused-kernel`
  is torch's own fused SGD kernel, `fused=True`, the best unfused step)
- stash: the copy of the weights an in-flight backward needs, then the step
- ema: the two lerps of `ema`'s buffer around the step (steady state: n = d)
Each strategy is built by the library with delay 4 (stash: a backward pending on every version).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from layerpipe.engine.fused import FusedUpdate
from layerpipe.report.records import environment
from layerpipe.weights import make_strategy


def stage(mib: float, strategy: str, fused: bool, torch_fused: bool = False):
    """One stage's (update, release, fused update or None): `update` runs one update as the
    engine does, `release` ends the backward of the version it saved (stash)."""
    n = int((mib * 2**20 / 16) ** 0.5)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, n) * 0.01) for _ in range(4)]
    params += [torch.nn.Parameter(torch.zeros(n)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True if torch_fused else None)
    weights = make_strategy("latest" if strategy == "sync" else strategy, params, 4, opt)
    fuse = FusedUpdate(0, opt, weights, params) if fused else None

    def update() -> None:
        if weights.name == "stash":
            weights.record_forward()  # a backward waits for this version: the copy is needed
        if fuse is not None and fuse.step():
            return
        weights.before_update()
        opt.step()
        weights.after_update()

    def release() -> None:
        if weights.name == "stash":  # its backward ran: the version's buffer is free again
            weights.release(weights.version - 1)

    return update, release, fuse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", default="1,4,16", help="stage sizes in MiB, comma-separated")
    p.add_argument("--updates", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    env = environment()
    print(f"Command: `python benchmarks/fused_update.py --mib {args.mib} --updates {args.updates} "
          f"--repeats {args.repeats}`")
    print(f"Machine: {env['processor']}, {env['cpus']} CPUs, 1 torch thread; torch {env['torch']}; "
          f"date {env['date']}; commit {env['commit']}")
    print()
    sweep = torch.randn(16 * 2**20)
    variants = [("sync", False, False), ("sync fused-kernel", False, True), ("sync", True, False),
                ("stash", False, False), ("stash", True, False), ("ema", False, False), ("ema", True, False)]
    print("| MiB | " + " | ".join(f"{name}{' (fused update)' if f else ''}" for name, f, _ in variants)
          + " | ema fused / sync fused-kernel |")
    print("|---:|" + "---:|" * (len(variants) + 1))
    for mib in (float(m) for m in args.mib.split(",")):
        runs = []
        for name, f, kernel in variants:
            update, release, fuse = stage(mib, name.split()[0], f, kernel)
            for _ in range(4):  # SGD's first step (momentum buffer), the compile, the steady state
                update()
                release()
            runs.append((update, release, fuse))
        times: list[list[float]] = [[] for _ in variants]
        base: list[float] = []
        for _ in range(args.repeats):
            start = time.process_time()
            for _ in range(args.updates):
                sweep.add_(1.0)
            base.append((time.process_time() - start) / args.updates)
            for i, (update, release, _fuse) in enumerate(runs):
                start = time.process_time()
                for _ in range(args.updates):
                    sweep.add_(1.0)
                    update()
                    release()
                times[i].append((time.process_time() - start) / args.updates)
        for (name, f, _), (_u, _r, fuse) in zip(variants, runs):
            if f and fuse.fused_steps < args.updates * args.repeats:
                raise SystemExit(f"{name}: the fused update did not fuse every update")
        sweep_ms = 1e3 * statistics.median(base)
        med = [1e3 * statistics.median(t) - sweep_ms for t in times]
        print(f"| {mib:g} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {med[-1] / med[1]:.2f}x |", flush=True)
    print(f"\nms per update, the cache-evicting sweep ({sweep_ms:.2f} ms) taken off; medians of {args.repeats} "
          f"interleaved repeats of {args.updates} updates.")
    print(f"\nThe fixed cost of a fused call (why stages under 1 MiB stay unfused): {call_cost():.3f} ms per "
          f"update of ema's fused update on a stage of 4 x 16 x 16 floats and their biases (warm caches, "
          f"median of 5 x 2000), its arithmetic next to nothing.")
    return 0


def call_cost() -> float:
    """ms per fused update of a tiny stage: torch.compile's guards and wrappers, and ours."""
    update, release, fuse = stage(4 * 16 * 16 * 4 / 2**20, "ema", True)
    for _ in range(4):
        update()
    runs = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(2000):
            update()
        runs.append((time.process_time() - start) / 2000 * 1e3)
    assert fuse is not None and fuse.fused_steps >= 10000
    return statistics.median(runs)


if __name__ == "__main__":
    sys.exit(main())
