"""(e) `pipemare`: PipeMare's annealed per-stage learning-rate rescaling, with warm-up, per tick.

Stale gradients hurt most early, when the weights move fast. At tick t the wrapped optimizer's
learning rate is multiplied by

    s_k(t) = min(1, (t + 1) / warmup) * max(1, d_k) ** -(power * (1 - min(1, t / anneal)))

so a stage with delay d_k starts at lr / d_k ** power (power 1: PipeMare's lr / d_k) and
reaches the full lr after `anneal` ticks (Yang et al., PipeMare, 2021); `anneal=never` keeps lr
/ d_k ** power for the whole run (what the transformer recipe measured best: the longer the
scaling lasted, the lower the pipelined loss). `pipeline_lr=f` multiplies the lr of every
stage, the undelayed ones included, by f when the pipeline has any delay (a synchronous run,
all delays 0, keeps its own lr): with PipeMare's lr / d_k the transformer's pipelined runs
measured best at 1.25x sync's best lr with microbatches of one sequence (0.75x with larger
microbatches, before). `pipeline_warmup=N`, likewise, sets the warm-up length (ticks) of a
pipelined run, `warmup` staying that of a synchronous one (the transformer: sync is best with a
short warm-up, 8 updates, its pipelined runs with 120 ticks). `adamw=` sets what the AdamW part
of `muon` (its vectors, embeddings and output matrix) gets: `scaled` (the default) both factors
like every group, `pipeline` only `pipeline_lr`, `full` neither (warm-up only): the diagnosis
found an embedding's delay nearly harmless, and the transformer's pipelined runs measured best
with the AdamW part at the full lr. The group's lr is restored after the step, so any outer
schedule that sets it keeps working. No memory.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.compensate.base import Compensation
from layerpipe.compensate.muon import ADAMW_PART
from layerpipe.compensate.registry import register


def pipemare_scale(tick: int, delay: int, anneal: int | None, warmup: int, power: float = 1.0) -> float:
    """s_k(t) above; `anneal` None: never annealed (lr / d_k ** power throughout)."""
    warm = min(1.0, (tick + 1) / warmup) if warmup > 0 else 1.0
    if anneal is None:
        p = 1.0
    elif anneal > 0:
        p = 1.0 - min(1.0, tick / anneal)
    else:  # anneal 0: the full lr at once
        p = 0.0
    return warm * max(1, delay) ** -(power * p)


#: what `adamw=` may give the AdamW part of `muon` (module docstring)
ADAMW_RULES = ("scaled", "pipeline", "full")


@register("pipemare", rank=20)
class PipeMare(Compensation):
    name = "pipemare"

    def __init__(
        self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer, *, anneal: int | str = 500,
        warmup: int = 100, power: float = 1.0, pipeline_lr: float = 1.0, adamw: str = "scaled",
        pipeline_warmup: int | None = None, max_delay: int | None = None,
    ) -> None:
        super().__init__(params, delay, optimizer)
        if anneal != "never" and (not isinstance(anneal, (int, float)) or anneal < 0):
            raise ValueError(f"anneal must be a number of ticks >= 0 or 'never', got {anneal!r}")
        if not isinstance(pipeline_lr, (int, float)) or not 0 < pipeline_lr <= 10:
            raise ValueError(f"pipeline_lr must be a factor in (0, 10], got {pipeline_lr!r}")
        for name, given in (("pipeline_lr", pipeline_lr != 1.0), ("pipeline_warmup", pipeline_warmup is not None)):
            if given and max_delay is None:
                raise ValueError(f"{name} needs the pipeline's largest delay (build it through the pipeline)")
        if pipeline_warmup is not None and (not isinstance(pipeline_warmup, int) or pipeline_warmup < 0):
            raise ValueError(f"pipeline_warmup must be a number of ticks >= 0, got {pipeline_warmup!r}")
        if adamw not in ADAMW_RULES:
            raise ValueError(f"adamw must be one of {', '.join(ADAMW_RULES)}, got {adamw!r}")
        self.adamw = adamw
        self.anneal = None if anneal == "never" else int(anneal)
        pipelined = (max_delay or 0) > 0
        self.warmup = int(pipeline_warmup) if pipelined and pipeline_warmup is not None else int(warmup)
        self.power = float(power)
        #: the factor on every stage of a pipeline with delays (1 in a synchronous run)
        self.pipeline_factor = float(pipeline_lr) if pipelined else 1.0
        self.ticks = 0

    def step(self, closure=None) -> None:
        scale = pipemare_scale(self.ticks, self.delay, self.anneal, self.warmup, self.power) * self.pipeline_factor
        warm = pipemare_scale(self.ticks, 0, None, self.warmup)  # without the per-delay factor
        adamw_scale = {"scaled": scale, "pipeline": warm * self.pipeline_factor, "full": warm}[self.adamw]
        saved = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * (adamw_scale if g.get("part") == ADAMW_PART else scale)
        try:
            self.optimizer.step()
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr
        self.ticks += 1

    def own_state(self) -> dict[str, Any]:
        return {"ticks": self.ticks}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.ticks = int(state["ticks"])
