"""Weight strategies: which weights a delayed backward pass uses, and what that costs.

`sync` and `stash` are exact; `ema` is the LayerPipe2 reconstruction; `latest` is the
no-correction baseline; `weight-ema`, `extrapolate` and `momentum` are other estimators kept
for comparison; `probe` trains like `stash` and measures every estimator against it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerpipe.errors import LayerpipeError
from layerpipe.weights.base import WeightStrategy
from layerpipe.weights.ema import UpdateEMA
from layerpipe.weights.estimators import Extrapolate, MomentumReuse, WeightEMA
from layerpipe.weights.flat import FlatBuffer
from layerpipe.weights.probe import ReconstructionProbe
from layerpipe.weights.simple import Latest, Sync
from layerpipe.weights.stash import Stash

STRATEGIES: dict[str, type[WeightStrategy]] = {
    cls.name: cls for cls in (Sync, Stash, UpdateEMA, Latest, WeightEMA, Extrapolate, MomentumReuse, ReconstructionProbe)
}
#: the paper's comparison, in report order
MAIN_STRATEGIES = ("sync", "stash", "ema", "latest")


def make_strategy(
    name: str, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer | None = None
) -> WeightStrategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise LayerpipeError(f"unknown weight strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None
    return cls(params, delay, optimizer)


__all__ = ["MAIN_STRATEGIES", "STRATEGIES", "FlatBuffer", "WeightStrategy", "make_strategy"]
