"""`probe`: exact stashing that also measures how well each estimator rebuilds past weights.

The backward uses the exact stashed weights (so training follows `stash`), while shadow
copies of the estimators track the same parameters; at every backward each shadow's
reconstruction is compared with the exact version. `errors()` gives, per estimator, the
root of the summed squared error over all backwards, and `relative_errors()` the same
divided by `latest`'s (how much of the staleness error the estimator removes).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.errors import LayerpipeError
from layerpipe.weights.base import WeightStrategy
from layerpipe.weights.ema import UpdateEMA
from layerpipe.weights.estimators import Extrapolate, MomentumReuse, WeightEMA
from layerpipe.weights.registry import register_strategy
from layerpipe.weights.simple import Latest
from layerpipe.weights.stash import Stash

SHADOWS = (UpdateEMA, Latest, Extrapolate, WeightEMA, MomentumReuse)


@register_strategy
class ReconstructionProbe(Stash):
    """trains like stash while measuring every estimator's reconstruction error"""

    name = "probe"
    checkpointable = False

    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(params, delay, optimizer)
        self.shadows = {}
        for name, make in self.shadow_factories(delay).items():
            try:
                self.shadows[name] = make(params, delay, optimizer)
            except LayerpipeError:  # e.g. `momentum` without SGD momentum: not measurable here
                continue
        self.squared_error = {name: 0.0 for name in self.shadows}
        self.backwards = 0

    def shadow_factories(self, delay: int) -> dict[str, Callable[..., WeightStrategy]]:
        """Estimators to measure, by name; override to measure others."""
        return {cls.name: cls for cls in SHADOWS}

    def record_forward(self) -> int:
        for s in self.shadows.values():
            s.record_forward()
        return super().record_forward()

    def backward_weights(self, version: int) -> list[Tensor]:
        exact = super().backward_weights(version)
        if self.version != version and exact:
            self.backwards += 1
            for name, s in self.shadows.items():
                diff = torch._foreach_sub(s.backward_weights(version), exact)
                self.squared_error[name] += float(sum(n**2 for n in torch._foreach_norm(diff)))
        return exact

    def before_update(self) -> None:
        for s in self.shadows.values():
            s.before_update()
        super().before_update()

    def after_update(self) -> None:
        super().after_update()
        for s in self.shadows.values():
            s.after_update()

    def errors(self) -> dict[str, float]:
        return {name: e**0.5 for name, e in self.squared_error.items()}

    def relative_errors(self) -> dict[str, float]:
        base = self.squared_error.get("latest", 0.0) ** 0.5
        return {name: (e / base if base > 0 else 0.0) for name, e in self.errors().items()}

    def state_dict(self) -> dict[str, Any]:
        raise LayerpipeError("weights 'probe' is a measurement tool; it cannot be checkpointed")
