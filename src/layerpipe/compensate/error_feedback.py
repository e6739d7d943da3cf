"""(b) `error-feedback`: over-apply the change of the update, p <- p - u_t - c (u_t - u_{t-1}).

u_t is the step the wrapped optimizer takes (p <- p - u_t). The extra term extrapolates the
update's trend over the delay, as delay-compensated asynchronous methods do (Zmushko et al.,
2026). With `per_delay=True` the coefficient is c * d_k (a linear trend over d_k ticks).
Memory: the previous update, |W_k| on stages with d_k > 0 (stages without delay are left
alone). A transient copy of the weights is made during each step (not history).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.compensate.base import Compensation
from layerpipe.compensate.registry import register


@register("error-feedback", rank=30)
class ErrorFeedback(Compensation):
    name = "error-feedback"

    def __init__(
        self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer, *, c: float = 0.5, per_delay: bool = False
    ) -> None:
        super().__init__(params, delay, optimizer)
        self.c = c * delay if per_delay else c
        self._live = [p.detach() for p in self.params]
        active = delay > 0 and self.c != 0 and bool(self._live)
        self._prev = [torch.zeros_like(p) for p in self._live] if active else None

    # its correction c (delta - prev) moves the weights on the tick after an update too, even
    # when an accumulation inside it makes none: every tick is an update of its own
    def steps_now(self) -> bool:
        return True if self._prev is not None else super().steps_now()

    def update_period(self) -> int:
        return 1 if self._prev is not None else super().update_period()

    def step(self, closure=None) -> None:
        if self._prev is None:
            self.optimizer.step()
            return
        before = torch._foreach_mul(self._live, 1.0)
        self.optimizer.step()
        delta = torch._foreach_sub(self._live, before)  # = -u_t
        # p <- p + delta + c (delta - prev)
        torch._foreach_add_(self._live, torch._foreach_sub(delta, self._prev), alpha=self.c)
        torch._foreach_copy_(self._prev, delta)

    def own_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._prev) if self._prev is not None else 0

    def own_state(self) -> dict[str, Any]:
        return {"prev": [t.clone() for t in self._prev] if self._prev is not None else None}

    def load_own_state(self, state: dict[str, Any]) -> None:
        if self._prev is not None and state["prev"] is not None:
            torch._foreach_copy_(self._prev, [t.to(p.device) for t, p in zip(state["prev"], self._prev)])
