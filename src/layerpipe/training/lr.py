"""Learning rates: per epoch (warm-up, cosine or constant) and per stage (`--stage-lr`)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from layerpipe.training.config import TrainConfig


def epoch_lr(config: TrainConfig, epoch: int) -> float:
    """Learning rate of an epoch (0-based): linear warm-up, then cosine decay or constant."""
    base = float(config.lr)
    if epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    if config.lr_schedule == "constant":
        return base
    span = max(1, config.epochs - config.warmup_epochs)
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


def set_lr(optimizers: Iterable[torch.optim.Optimizer | None], delays: Iterable[int], lr: float, stage_lr: str) -> None:
    """Give each stage's optimizer the epoch's learning rate, scaled per stage by `stage_lr`."""
    for opt, delay in zip(optimizers, delays):
        if opt is not None:
            scaled = lr / delay if stage_lr == "inverse-delay" and delay > 0 else lr
            for group in opt.param_groups:
                group["lr"] = scaled
