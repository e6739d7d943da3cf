"""Time per tick of one model of `strategy_overhead.py` through `Pipeline`, per strategy: the
quick probe for an A/B of two commits (run it with each checkout's `src` first on PYTHONPATH,
interleaved, in one quiet window).

    PYTHONPATH=src python benchmarks/tick_time.py mlp-512 4 sync,stash,ema
    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old/src python benchmarks/tick_time.py mlp-512 4 sync,stash,ema

SGD with momentum 0.01/0.9, 20 ticks of warm-up, then 150 timed ticks, 5 interleaved repeats;
CPU time per tick (median) and the ratio to `sync`, 1 thread. A name with `+fused` runs that
strategy with `fused_update=True` (`sync,sync+fused,ema,ema+fused`: both updates side by side;
each fused run checks that every stage's updates did fuse).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_overhead import MODELS, batch_for, pipeline_for  # noqa: E402

import layerpipe  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("stages", type=int)
    p.add_argument("weights", help="comma-separated, with sync: e.g. sync,stash,ema")
    p.add_argument("--ticks", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    make, batch = MODELS[args.model]
    data = [batch_for(args.model, batch) for _ in range(8)]
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for w in args.weights.split(","):
            weights, _, option = w.partition("+")
            if option not in ("", "fused"):
                p.error(f"unknown option {option!r} in {w!r} (only +fused)")
            torch.manual_seed(0)
            pipe = pipeline_for(args.model, make(), args.stages, weights, fused_update=option == "fused",
                                optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
            for i in range(20):
                pipe.step(*data[i % 8])
            fused_before = [s.fused.fused_steps for s in pipe.stages if s.fused is not None]
            start = time.process_time()
            for i in range(args.ticks):
                pipe.step(*data[i % 8])
            times.setdefault(w, []).append((time.process_time() - start) / args.ticks * 1e3)
            fused_after = [s.fused.fused_steps for s in pipe.stages if s.fused is not None]
            if option and any(b - a < args.ticks for a, b in zip(fused_before, fused_after)):
                raise SystemExit(f"{w}: a stage's update did not fuse every tick ({fused_before} -> {fused_after})")
    med = {w: statistics.median(v) for w, v in times.items()}
    base = med.get("sync")
    cells = [f"{w} {m:.3f}ms" + (f" ({m / base:.3f}x)" if base else "") for w, m in med.items()]
    print(f"{args.model} K={args.stages} [{Path(layerpipe.__file__).parent}]: " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
