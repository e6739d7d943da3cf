"""A fixed tick loop through the public `Pipeline` API, for timing two checkouts side by side.

    farm-bench -n 5 --timeout 600 \\
      --vs "sh -c 'PYTHONPATH=OLD/src exec .venv/bin/python benchmarks/tick_loop.py sync,stash,ema,latest 150'" \\
      -- sh -c 'exec .venv/bin/python benchmarks/tick_loop.py sync,stash,ema,latest 150'

Trains the 512-wide MLP of `strategy_overhead.py` (8 blocks, batch 64, SGD momentum) at
4 stages for N ticks under each listed strategy, one thread. It prints nothing: the whole
process is the measurement (results in benchmarks/results/restructure-ab.md).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from layerpipe import Pipeline


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(256, 512), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(6)]
    return nn.Sequential(*blocks, nn.Linear(512, 10))


def main() -> int:
    torch.set_num_threads(1)
    strategies, ticks = sys.argv[1].split(","), int(sys.argv[2])
    data = [(torch.randn(64, 256), torch.randint(0, 10, (64,))) for _ in range(8)]
    for weights in strategies:
        pipe = Pipeline(mlp(), stages=4, weights=weights, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
        for i in range(ticks):
            pipe.step(*data[i % 8])
    return 0


if __name__ == "__main__":
    sys.exit(main())
