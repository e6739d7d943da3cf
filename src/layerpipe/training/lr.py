"""Learning rates: per epoch (warm-up, cosine or constant), per microbatch (`cosine-step`:
the cosine decay continued within each epoch), and per stage (`--stage-lr`)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from layerpipe.training.config import TrainConfig


def epoch_lr(config: TrainConfig, epoch: float) -> float:
    """Learning rate at `epoch` (0-based; fractional within an epoch for `cosine-step`):
    linear warm-up, then cosine decay or constant."""
    base = float(config.lr)
    if epoch < config.warmup_epochs:
        return base * (int(epoch) + 1) / (config.warmup_epochs + 1)
    if config.lr_schedule == "constant":
        return base
    span = max(1, config.epochs - config.warmup_epochs)
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


def step_lr_setter(config: TrainConfig, epoch: int, steps: int, optimizers, delays, stage_lr: str):
    """For `cosine-step`: a callback that, called after each microbatch of the epoch, sets the
    learning rate of the next one (the cosine continued within the epoch); None otherwise."""
    if config.lr_schedule != "cosine-step" or epoch < config.warmup_epochs:
        return None
    done = [0]

    def advance() -> None:
        done[0] += 1
        set_lr(optimizers, delays, epoch_lr(config, epoch + min(done[0], steps) / steps), stage_lr)

    return advance


def set_lr(optimizers: Iterable[torch.optim.Optimizer | None], delays: Iterable[int], lr: float, stage_lr: str) -> None:
    """Give each stage's optimizer the epoch's learning rate, scaled per stage by `stage_lr`."""
    for opt, delay in zip(optimizers, delays):
        if opt is not None:
            scaled = lr / delay if stage_lr == "inverse-delay" and delay > 0 else lr
            for group in opt.param_groups:  # a group may run at a fixed ratio (muon's AdamW part)
                group["lr"] = scaled * group.get("lr_scale", 1.0)
