"""(c) `predict`: forward on predicted weights W + c d_k u_hat, backward on the strategy's weights.

The gradient a stage computes now is applied d_k ticks later, when the weights will have
moved by about d_k u_hat, u_hat the bias-corrected EMA of applied updates (decay
alpha_k = 2 / (d_k + 1)). Running the forward at that point (SpecTrain, XPipe; PipeMare's
discrepancy correction) makes the gradient fresh when it lands. The backward still uses the
weights the weight strategy gives for that forward's version (the live weights of that
tick: exact with `stash`, rebuilt with `ema`), through the stage's saved-tensor hooks.

Memory: with the `ema` strategy the prediction reuses its update average (`UpdateEMA.shift_`,
same alpha, same bias correction): zero extra bytes. With any other strategy this wrapper
keeps its own average, |W_k| on stages with d_k > 0. The forward makes a transient copy of
the live weights to restore them exactly afterwards (not history).

Needs `attach(stage)`: it installs `stage.forward_context`. It must be the outermost
wrapper, so that its own average sees the whole applied update.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from layerpipe.compensate.base import Compensation
from layerpipe.compensate.registry import register
from layerpipe.weights.ema import UpdateEMA


@register("predict", rank=90)
class Predict(Compensation):
    name = "predict"

    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer, *, c: float = 1.0) -> None:
        super().__init__(params, delay, optimizer)
        self.c = float(c)
        self._live = [p.detach() for p in self.params]
        self.alpha = 2.0 / (delay + 1)
        self.steps = 0
        self._avg: list[Tensor] | None = None  # own average, allocated by attach() if needed
        self._shared: UpdateEMA | None = None  # the ema strategy whose average is reused

    def attach(self, stage: Any) -> None:
        super().attach(stage)
        if not self._forecasts:
            return
        strategy = getattr(stage, "strategy", None)
        if isinstance(strategy, UpdateEMA) and strategy._avg is not None and abs(strategy.alpha - self.alpha) < 1e-12:
            self._shared = strategy
        elif self._avg is None:
            self._avg = [torch.zeros_like(p) for p in self._live]
        stage.forward_context = self.predicted_weights

    def _predict_(self) -> bool:
        """live += c d u_hat in place; False (nothing done) before any update."""
        if self._shared is not None:
            return self._shared.shift_(self._live, self.c * self.delay)
        if self._avg is None or self.steps == 0:
            return False
        factor = 1.0 / (1.0 - (1.0 - self.alpha) ** self.steps)
        torch._foreach_add_(self._live, self._avg, alpha=self.c * self.delay * factor)
        return True

    @contextmanager
    def predicted_weights(self) -> Iterator[None]:
        saved = torch._foreach_mul(self._live, 1.0)
        if not self._predict_():
            yield
            return
        try:
            yield
        finally:
            torch._foreach_copy_(self._live, saved)

    # its forecast c d_k u_hat counts ticks (its average, or ema's it shares, takes every
    # tick's update, zero or not): the stage's strategy must count ticks too
    def steps_now(self) -> bool:
        return True if self._forecasts else super().steps_now()

    def update_period(self) -> int:
        return 1 if self._forecasts else super().update_period()

    @property
    def _forecasts(self) -> bool:
        return self.delay > 0 and bool(self._live) and self.c != 0

    def step(self, closure=None) -> None:
        if self._avg is None:
            self.optimizer.step()
            return
        before = torch._foreach_mul(self._live, 1.0)
        self.optimizer.step()
        torch._foreach_lerp_(self._avg, torch._foreach_sub(self._live, before), self.alpha)
        self.steps += 1

    def own_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._avg) if self._avg is not None else 0

    def own_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "avg": [t.clone() for t in self._avg] if self._avg is not None else None}

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if self._avg is not None and state["avg"] is not None:
            torch._foreach_copy_(self._avg, [t.to(a.device) for t, a in zip(state["avg"], self._avg)])
