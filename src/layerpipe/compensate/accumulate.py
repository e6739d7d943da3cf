"""(d) `accumulate`: per-stage gradient accumulation, one update every A_k ticks.

Fewer, larger updates make a delay of d_k ticks a staleness of only ceil(d_k / A_k) updates
(PipeDream-2BW, PACI). A_k = `every` on every stage, or d_k + 1 with `per_delay=True`
(staleness at most one update). The applied gradient is the mean of the A_k gradients; on
the other ticks the weights do not move. Compare with a synchronous run that accumulates the
same A (the same effective batch).

Memory: inside the engine (`attach(stage)`) the sum lives in the parameters' own `.grad`:
the stage keeps the gradients between the ticks of an accumulation and autograd adds the
next backward's into them in place, so nothing is held beyond the gradient every backward
makes anyway (0 extra bytes; the gradient buffer lives across the A_k ticks instead of one).
Where the stage cannot keep them (gradient clipping, tied parameters; `Stage.can_keep_grads`)
and outside the engine, a separate sum: |W_k| on stages with A_k > 1.
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
        self._stage: Any = None  # set by attach: the stage that keeps the gradients for us
        # the separate sum, allocated at the first step that needs it (where `in_grad` is
        # False): whether the stage keeps gradients is known only once it is linked
        self._sum: list[Tensor] | None = None

    def attach(self, stage: Any) -> None:
        super().attach(stage)
        self._stage = stage

    @property
    def in_grad(self) -> bool:
        """True: the sum lives in `.grad` (the stage keeps it between ticks). Asked at each
        step, not at attach: the stage learns of its tied parameters after attach."""
        return self.every > 1 and self._stage is not None and self._stage.can_keep_grads

    def holds_grads(self) -> bool:
        """True between the ticks of an accumulation kept in `.grad`: the stage must not clear
        the gradients, the next backward adds into them."""
        return (self.in_grad and 0 < self.count < self.every) or super().holds_grads()

    def steps_now(self) -> bool:
        """Only the step that completes an accumulation changes the weights."""
        return self.count + 1 >= self.every and super().steps_now()

    def update_period(self) -> int:
        return self.every * super().update_period()

    def step(self, closure=None) -> None:
        if self.every == 1:
            self.optimizer.step()
            return
        in_grad = self.in_grad
        if not in_grad:
            if self._sum is None:
                self._sum = [torch.zeros_like(p) for p in self.params]
            torch._foreach_add_(self._sum, [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        self.count += 1
        if self.count < self.every:
            return
        if in_grad:
            torch._foreach_div_([p.grad for p in self.params if p.grad is not None], float(self.every))
        else:
            assert self._sum is not None
            for p, s in zip(self.params, self._sum):
                p.grad = s / self.every
        self.optimizer.step()
        if self._sum is not None:
            for s in self._sum:
                s.zero_()
        self.count = 0

    def _partial_sum(self) -> list[Tensor | None] | None:
        """The gradients summed so far in this accumulation (None: nothing summed)."""
        if self.count == 0:
            return None
        if self.in_grad:
            return [p.grad.clone() if p.grad is not None else None for p in self.params]
        assert self._sum is not None
        return [t.clone() for t in self._sum]

    def own_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._sum) if self._sum is not None else 0

    def own_state(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self._partial_sum()}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        sums = state["sum"]
        if sums is None or self.every == 1:
            return
        sums = [t.to(p.device) if t is not None else torch.zeros_like(p) for t, p in zip(sums, self.params)]
        if self.in_grad:
            for p, t in zip(self.params, sums):
                p.grad = t
        else:
            if self._sum is None:
                self._sum = [torch.zeros_like(p) for p in self.params]
            torch._foreach_copy_(self._sum, sums)
