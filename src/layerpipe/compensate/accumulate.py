"""(d) `accumulate`: per-stage gradient accumulation, one update every A_k ticks.

Fewer, larger updates make a delay of d_k ticks a staleness of only ceil(d_k / A_k) updates
(PipeDream-2BW, PACI). A_k = `every` on every stage, or d_k + 1 with `per_delay=True`
(staleness at most one update). The applied gradient is the mean of the A_k gradients; on
the other ticks the weights do not move. Compare with a synchronous run that accumulates the
same A (the same effective batch). Memory: the gradient sum, |W_k| on stages with A_k > 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.compensate.base import Compensation
from layerpipe.compensate.registry import register
from layerpipe.errors import LayerpipeError


@register("accumulate", rank=10)
class Accumulate(Compensation):
    name = "accumulate"

    def __init__(
        self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer, *, every: int = 2, per_delay: bool = False
    ) -> None:
        super().__init__(params, delay, optimizer)
        self.every = delay + 1 if per_delay else int(every)
        if self.every < 1:
            raise LayerpipeError(f"accumulate: every must be >= 1, got {self.every}")
        self.count = 0
        self._sum = [torch.zeros_like(p) for p in self.params] if self.every > 1 else None

    def step(self, closure=None) -> None:
        if self._sum is None:
            self.optimizer.step()
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_add_(self._sum, grads)
        self.count += 1
        if self.count < self.every:
            return
        for p, s in zip(self.params, self._sum):
            p.grad = s / self.every
        self.optimizer.step()
        for s in self._sum:
            s.zero_()
        self.count = 0

    def own_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._sum) if self._sum is not None else 0

    def own_state(self) -> dict[str, Any]:
        return {"count": self.count, "sum": [t.clone() for t in self._sum] if self._sum is not None else None}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        if self._sum is not None and state["sum"] is not None:
            torch._foreach_copy_(self._sum, [t.to(s.device) for t, s in zip(state["sum"], self._sum)])
