"""Probe: what a fused `ema` kernel would save (a lead for issue 15, not used by the library).

    .venv/bin/python benchmarks/ema_fused_probe.py [--mib 30]

Per update, `ema` makes two passes over a stage's weights W and its average E: the EMA update
E <- lerp(E, W, alpha) after the optimizer step and the rebuild R = W + c (E - W) for the
backward. Both are bandwidth-bound. Fused (the EMA update deferred to the backward, one loop
reading W and E and writing E and R, generated here by torch.compile's inductor with a C++
compiler), the traffic drops from 6 to 4 stage sizes. Prints ms per update for both, 1 thread.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=30.0, help="stage size in MiB (default 30: the distributed benchmark's stage 0)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = int(args.mib * 1024 * 1024 // 4)
    w, e, r = torch.randn(n), torch.randn(n), torch.empty(n)
    alpha, c = 0.5, -1.7

    def unfused() -> None:
        e.lerp_(w, alpha)
        torch.lerp(w, e, c, out=r)

    @torch.compile(dynamic=False)
    def fused(w, e, r, c):
        e.lerp_(w, alpha)
        r.copy_(w + c * (e - w))

    ct = torch.tensor(c)

    def timed(f) -> float:
        for _ in range(3):
            f()
        start = time.perf_counter()
        for _ in range(args.repeats):
            f()
        return (time.perf_counter() - start) / args.repeats * 1e3

    print(f"stage of {args.mib:g} MiB, torch {torch.__version__}, 1 thread")
    first = timed(unfused)
    try:
        fused_ms = timed(lambda: fused(w, e, r, ct))
    except Exception as ex:  # no C++ compiler, or inductor missing
        print(f"fused: torch.compile failed ({type(ex).__name__}: {str(ex)[:200]})")
        return 1
    second = timed(unfused)
    print(f"two passes (today): {first:.2f} / {second:.2f} ms; fused: {fused_ms:.2f} ms "
          f"({fused_ms / ((first + second) / 2):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
