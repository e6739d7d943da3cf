"""Other estimators of past weights, kept for comparison with `ema` (see `layerpipe compare`).

- `weight-ema`: the backward uses a plain EMA of the weights with a generic decay (0.9),
  as a smoothed stand-in for the old weights; memory |W_k| per stage with d_k > 0.
- `extrapolate`: W_then = W_now - n * (last applied update); memory |W_k|.
- `momentum`: SpecTrain-style reuse of SGD's momentum buffer v (the step is -lr * v):
  W_then = W_now + n * lr * v; zero extra memory, SGD with momentum only.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.errors import LayerpipeError
from layerpipe.weights.base import WeightStrategy
from layerpipe.weights.flat import FlatBuffer
from layerpipe.weights.registry import register_strategy


@register_strategy
class WeightEMA(WeightStrategy):
    """a plain EMA of the weights (decay 0.9) stands in for the old weights"""

    name = "weight-ema"

    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer | None = None, decay: float = 0.9) -> None:
        super().__init__(params, delay, optimizer)
        self.decay = decay
        self._avg: FlatBuffer | None = None
        if delay > 0 and self.params:
            self._avg = FlatBuffer(self.params, separate=True)  # handed to the backward as it is
            self._avg.copy_from(self.params)

    def backward_weights(self, version: int) -> list[Tensor]:
        if self.version == version or self._avg is None:
            return self.params
        return self._avg.views

    def after_update(self) -> None:
        super().after_update()
        if self._avg is not None:
            torch._foreach_lerp_(self._avg.views, self.params, 1.0 - self.decay)

    @staticmethod
    def history_versions(delay: int) -> int:
        return 1 if delay > 0 else 0

    def history_bytes(self) -> int:
        return self._avg.nbytes if self._avg is not None else 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._avg is not None:
            state["avg"] = self._avg.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._avg is not None:
            self._avg.load_state(state["avg"])


@register_strategy
class Extrapolate(WeightStrategy):
    """W_now - n * (last applied update)"""

    name = "extrapolate"

    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(params, delay, optimizer)
        self._last = FlatBuffer(self.params, zero=True) if delay > 0 and self.params else None
        self._before: list[Tensor] | None = None

    def backward_weights(self, version: int) -> list[Tensor]:
        n = self.version - version
        if n == 0 or self._last is None:
            return self.params
        return torch._foreach_add(self.params, self._last.views, alpha=-n)

    def before_update(self) -> None:
        if self._last is not None:
            self._before = torch._foreach_mul(self.params, 1.0)

    def after_update(self) -> None:
        super().after_update()
        if self._last is not None and self._before is not None:
            self._last.copy_from(torch._foreach_sub(self.params, self._before))
            self._before = None

    @staticmethod
    def history_versions(delay: int) -> int:
        return 1 if delay > 0 else 0

    def history_bytes(self) -> int:
        return self._last.nbytes if self._last is not None else 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._last is not None:
            state["last"] = self._last.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._last is not None:
            self._last.load_state(state["last"])


@register_strategy
class MomentumReuse(WeightStrategy):
    """SpecTrain-style W_now + n * lr * (SGD momentum buffer), zero extra memory"""

    name = "momentum"
    reads_optimizer = True

    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(params, delay, optimizer)
        if delay > 0 and self.params and not _is_sgd_with_momentum(optimizer):
            raise LayerpipeError("weights 'momentum' needs torch.optim.SGD with momentum > 0")

    def backward_weights(self, version: int) -> list[Tensor]:
        n = self.version - version
        if n == 0 or self.optimizer is None:
            return self.params
        out = []
        for group in self.optimizer.param_groups:  # same order as the stage's parameters
            for p in group["params"]:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                live = p.detach()
                out.append(live if buf is None else live + (n * group["lr"]) * buf)
        return out


def _is_sgd_with_momentum(optimizer: torch.optim.Optimizer | None) -> bool:
    return isinstance(optimizer, torch.optim.SGD) and all(g.get("momentum", 0) > 0 for g in optimizer.param_groups)
