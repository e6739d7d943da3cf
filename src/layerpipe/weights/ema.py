"""`ema`: the LayerPipe2 reconstruction. Rebuild past weights instead of storing them.

    W_then = W_now - (sum of the n updates applied since that forward) ~= W_now - n * u_hat

u is an exponential moving average of the applied updates dW = W(t+1) - W(t), with a
pipeline-aware decay tied to the stage's delay, alpha_k = 2 / (d_k + 1) (centre of mass
(d_k - 1) / 2 updates back: the middle of the window of the last d_k updates), and start-up
bias correction u_hat = u / (1 - beta^t). n comes from an exact version counter. Memory: one
buffer per parameter of stages with d_k > 0, so at most |W| whatever the depth. It averages
applied updates, not gradients, so it works with any optimizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.weights.base import WeightStrategy
from layerpipe.weights.flat import FlatBuffer
from layerpipe.weights.registry import register_strategy


@register_strategy
class UpdateEMA(WeightStrategy):
    """LayerPipe2 reconstruction W_now - n * EMA(applied updates), one buffer per delayed stage"""

    name = "ema"

    def __init__(
        self,
        params: Sequence[Tensor],
        delay: int,
        optimizer: torch.optim.Optimizer | None = None,
        alpha: float | None = None,
    ) -> None:
        super().__init__(params, delay, optimizer)
        self.alpha = alpha if alpha is not None else 2.0 / (delay + 1)
        self.steps = 0  # updates folded into the average, for bias correction
        # a stage whose backward runs in the tick of its forward (d = 0) never needs history
        self._avg = FlatBuffer(self.params, zero=True) if delay > 0 and self.params else None
        self._before: list[Tensor] | None = None
        self._exact_delta = any(p.element_size() < 4 for p in self.params)

    def backward_weights(self, version: int) -> list[Tensor]:
        n = self.version - version
        if n == 0 or self._avg is None or self.steps == 0:
            return self.params
        correction = 1.0 - (1.0 - self.alpha) ** self.steps
        # one foreach kernel per dtype group; a transient copy, not history
        return torch._foreach_add(self.params, self._avg.views, alpha=-n / correction)

    def before_update(self) -> None:
        if self._avg is None:
            return
        if self._exact_delta:
            # transient copy of W(t): 16-bit weights need the exact dW = W(t+1) - W(t)
            self._before = torch._foreach_mul(self.params, 1.0)
        else:
            # u <- (1 - alpha) u - alpha W(t), completed after the step by + alpha W(t+1):
            # no allocation; the rounding error, ~eps |W| / |dW| relative to u (about 1e-4
            # in float32), is far below the reconstruction error itself
            torch._foreach_mul_(self._avg.views, 1.0 - self.alpha)
            torch._foreach_add_(self._avg.views, self.params, alpha=-self.alpha)

    def after_update(self) -> None:
        super().after_update()
        if self._avg is None:
            return
        if self._before is not None:
            delta = torch._foreach_sub(self.params, self._before)
            self._before = None
            torch._foreach_lerp_(self._avg.views, delta, self.alpha)
        else:
            torch._foreach_add_(self._avg.views, self.params, alpha=self.alpha)
        self.steps += 1

    @staticmethod
    def history_versions(delay: int) -> int:
        return 1 if delay > 0 else 0

    def history_bytes(self) -> int:
        return self._avg.nbytes if self._avg is not None else 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["steps"] = self.steps
        if self._avg is not None:
            state["avg"] = self._avg.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps = int(state["steps"])
        if self._avg is not None:
            self._avg.load_state(state["avg"])
