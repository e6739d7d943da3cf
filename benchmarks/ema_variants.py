"""Which estimator of past weights measures best? Reconstruction error against exact stashing.

    .venv/bin/python benchmarks/ema_variants.py [--out FILE]

Trains a deep tanh MLP (8 blocks of 64 units) on a synthetic teacher task in 8 stages
(delays 14, 12, ..., 2, 0) with exact stashing, while shadow estimators track the same
weights; at every backward each estimator's rebuild of the forward's weights is compared
with the exact stashed version. Reported: the RMS error as a fraction of `latest`'s (the
error of not correcting at all), per stage delay, for three optimizers. This is how the
decay of `ema` (alpha = 2 / (d + 1)) was chosen.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torch import nn

from layerpipe.engine.single import Pipeline
from layerpipe.report.records import environment
from layerpipe.weights import register_strategy
from layerpipe.weights.ema import UpdateEMA
from layerpipe.weights.estimators import Extrapolate, WeightEMA
from layerpipe.weights.probe import ReconstructionProbe
from layerpipe.weights.simple import Latest

VARIANTS = {
    "ema 2/(d+1)": lambda d: functools.partial(UpdateEMA, alpha=2 / (d + 1)),
    "ema 1/d": lambda d: functools.partial(UpdateEMA, alpha=1 / max(d, 1)),
    "ema 1/(d+1)": lambda d: functools.partial(UpdateEMA, alpha=1 / (d + 1)),
    "ema 4/(d+1)": lambda d: functools.partial(UpdateEMA, alpha=min(1.0, 4 / (d + 1))),
    "ema 0.1": lambda d: functools.partial(UpdateEMA, alpha=0.1),
    "extrapolate": lambda d: Extrapolate,
    "weight-ema 0.9": lambda d: WeightEMA,
    "latest": lambda d: Latest,
}


@register_strategy
class VariantProbe(ReconstructionProbe):
    name = "variant-probe"

    def shadow_factories(self, delay):
        return {name: make(delay) for name, make in VARIANTS.items()}


OPTIMIZERS = {
    "SGD lr 0.05 momentum 0.9": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "Adam lr 1e-3": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "SGD lr 0.1 no momentum": lambda ps: torch.optim.SGD(ps, lr=0.1),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    env = environment()
    lines = [
        "# Reconstruction error of past-weight estimators (fraction of `latest`'s error; lower is better)",
        "",
        f"Command: `python benchmarks/ema_variants.py --epochs {args.epochs}`. "
        f"torch {env['torch']}, {env['date']}, commit {env['commit']}",
        "",
    ]
    for opt_name, opt in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(8)], nn.Linear(64, 10))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, 64, generator=g)
        y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
        pipe = Pipeline(model, stages=8, weights=VariantProbe.name, optimizer=opt)
        for _ in range(args.epochs):
            for i in range(0, len(x), 64):
                pipe.step(x[i : i + 64], y[i : i + 64])
        pipe.flush()
        lines += [f"## {opt_name}", "", "| delay | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
        for stage in pipe.stages[:-1]:
            rel = stage.strategy.relative_errors()
            lines.append(f"| {stage.delay} | " + " | ".join(f"{rel[v]:.3f}" for v in VARIANTS) + " |")
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
