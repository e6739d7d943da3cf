"""Microbenchmark: what the two passes of the `ema` strategy over a stage's weights cost, and
whether reordering them helps.

    python benchmarks/ema_passes.py [--mib 16]

One stage of 4 weight matrices (1024 x 1024 by default, 16 MiB) and their biases, one torch
thread. Per "tick": a sweep over a 64 MB buffer stands for the forward and backward between
the optimizer step and the next rebuild (it evicts the caches), plus
- after-step: E <- lerp(E, W, alpha) right after the step (one foreach op), then the rebuild
  R = lerp(W, E, c) tensor by tensor into preallocated buffers (what `weights/ema.py` does);
- deferred: both lerps back to back per tensor at the rebuild (the second reads cached data);
- chunked: the same in 128 KiB pieces, so both fit in L2 (a Python op per piece);
- base: the sweep alone.
Prints ms per tick, twice, interleaved.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=16, help="weight MiB of the stage (4 square matrices)")
    p.add_argument("--ticks", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = int((args.mib * 2**20 / 16) ** 0.5)
    weights = [torch.randn(n, n) for _ in range(4)] + [torch.randn(n) for _ in range(4)]
    avg = [w.clone() for w in weights]
    out = [torch.empty_like(w) for w in weights]
    sweep = torch.randn(16 * 2**20)
    alpha, c = 0.5, -3.0

    def base() -> None:
        sweep.add_(1.0)

    def after_step() -> None:
        torch._foreach_lerp_(avg, weights, alpha)
        sweep.add_(1.0)
        for w, e, r in zip(weights, avg, out):
            torch.lerp(w, e, c, out=r)

    def deferred() -> None:
        sweep.add_(1.0)
        for w, e, r in zip(weights, avg, out):
            e.lerp_(w, alpha)
            torch.lerp(w, e, c, out=r)

    def chunked(piece: int = 32768) -> None:
        sweep.add_(1.0)
        for w, e, r in zip(weights, avg, out):
            wf, ef, rf = w.view(-1), e.view(-1), r.view(-1)
            for s in range(0, wf.numel(), piece):
                ef[s:s + piece].lerp_(wf[s:s + piece], alpha)
                torch.lerp(wf[s:s + piece], ef[s:s + piece], c, out=rf[s:s + piece])

    print(f"stage: 4 x {n}x{n} float32 ({sum(w.numel() for w in weights) * 4 / 2**20:.1f} MiB), torch {torch.__version__}")
    for fn in (base, after_step, deferred, chunked) * 2:
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(args.ticks):
            fn()
        print(f"{fn.__name__:10s} {(time.perf_counter() - start) / args.ticks * 1e3:6.2f} ms per tick")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
