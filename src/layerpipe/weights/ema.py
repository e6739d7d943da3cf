"""`ema`: the LayerPipe2 reconstruction. Rebuild past weights instead of storing them.

    W_then = W_now - (sum of the n updates applied since that forward) ~= W_now - n * u_hat

u is an exponential moving average of the applied updates dW = W(t+1) - W(t), with a
pipeline-aware decay tied to the stage's delay, alpha_k = 2 / (d_k + 1) (centre of mass
(d_k - 1) / 2 updates back: the middle of the window of the last d_k updates), and start-up
bias correction u_hat = u / (1 - beta^t). n comes from an exact version counter. Memory: one
buffer per parameter of stages with d_k > 0, so at most |W| whatever the depth. It averages
applied updates, not gradients, so it works with any optimizer.

How u is kept (same numbers up to float rounding, ~1e-7 relative): for 32- and 64-bit
weights, as an EMA of the weights themselves, E <- (1 - alpha) E + alpha W(t+1), started at
E = W when the first update comes. Then u = alpha / (1 - alpha) (W - E) exactly (both obey
the same recursion), so one pass over |W| after each optimizer step keeps it (u itself
needs one before and one after: the step overwrites W(t) in place), and the rebuilt weights
are one lerp, W_then = W + c (E - W), c = n alpha / ((1 - alpha) (1 - beta^t)). 16-bit
weights (E would round away small updates) and alpha = 1 (d = 1) keep u itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.weights.base import WeightStrategy
from layerpipe.weights.flat import SCRATCH, FlatBuffer
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
        self._before: list[Tensor] | None = None
        self._lent: list[Tensor] | None = None  # the scratch tensors of the last rebuild, until release
        self._exact_delta = any(p.element_size() < 4 for p in self.params)
        #: True: the buffer holds E, the EMA of the weights; False: u, the EMA of updates
        self.of_weights = not self._exact_delta and self.alpha < 1.0
        # a stage whose backward runs in the tick of its forward (d = 0) never needs history
        self._avg = FlatBuffer(self.params, zero=True) if delay > 0 and self.params else None
        # the rebuild: large tensors into lent scratch (no page faults), small ones fresh, in
        # one foreach kernel (the Python of a lending per small tensor costs more)
        lends = [SCRATCH.lends(p) for p in self.params]
        self._lent_index = [i for i, lent in enumerate(lends) if lent] if self._avg is not None else []
        self._fresh_index = [i for i, lent in enumerate(lends) if not lent]

    def _scale(self, n: float) -> float:
        """n * u_hat = scale * u (kept u) or scale * (E - W) (kept E)."""
        correction = 1.0 - (1.0 - self.alpha) ** self.steps
        if self.of_weights:
            return -n * self.alpha / ((1.0 - self.alpha) * correction)
        return n / correction

    def backward_weights(self, version: int) -> list[Tensor]:
        n = self.version - version
        if n == 0 or self._avg is None or self.steps == 0:
            return self.params
        scale = -self._scale(n)
        params, avg = self.params, self._avg.views
        if not self._lent_index:  # one foreach kernel per dtype group
            if self.of_weights:
                return torch._foreach_lerp(params, avg, scale)
            return torch._foreach_add(params, avg, alpha=scale)
        out: list[Tensor] = [params[0]] * len(params)
        if self._fresh_index:
            ps, avs = [params[i] for i in self._fresh_index], [avg[i] for i in self._fresh_index]
            fresh = torch._foreach_lerp(ps, avs, scale) if self.of_weights else torch._foreach_add(ps, avs, alpha=scale)
            for i, r in zip(self._fresh_index, fresh):
                out[i] = r
        self._lent = SCRATCH.take([params[i] for i in self._lent_index])  # a transient copy, not history
        # one pass per tensor, written in place (foreach ops have no out= on the CPU)
        for i, r in zip(self._lent_index, self._lent):
            if self.of_weights:
                torch.lerp(params[i], avg[i], scale, out=r)
            else:
                torch.add(params[i], avg[i], alpha=scale, out=r)
            out[i] = r
        return out

    def release(self, version: int) -> None:
        if self._lent is not None:  # the backward that read the rebuilt weights is done
            SCRATCH.give(self._lent)
            self._lent = None

    def shift_(self, targets: list[Tensor], n: float) -> bool:
        """targets += n * u_hat, in place; `targets` must alias the live weights (`params`).
        False (nothing done) before the first update. For a compensation that predicts the
        weights n updates ahead from this average (zero extra bytes)."""
        if self._avg is None or self.steps == 0:
            return False
        if self.of_weights:
            torch._foreach_lerp_(targets, self._avg.views, self._scale(n))
        else:
            torch._foreach_add_(targets, self._avg.views, alpha=self._scale(n))
        return True

    def before_update(self) -> None:
        if self._avg is None:
            return
        if self.of_weights:
            if self.steps == 0:  # E starts at the weights: no update averaged yet, u = 0
                self._avg.copy_from(self.params)
        elif self._exact_delta:
            # transient copy of W(t): 16-bit weights need the exact dW = W(t+1) - W(t)
            self._before = torch._foreach_mul(self.params, 1.0)
        else:
            # u <- (1 - alpha) u - alpha W(t), completed after the step by + alpha W(t+1)
            torch._foreach_mul_(self._avg.views, 1.0 - self.alpha)
            torch._foreach_add_(self._avg.views, self.params, alpha=-self.alpha)

    def after_update(self) -> None:
        super().after_update()
        if self._avg is None:
            return
        if self.of_weights:
            torch._foreach_lerp_(self._avg.views, self.params, self.alpha)
        elif self._before is not None:
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
            state["avg"] = self.update_average()
            if self.of_weights:  # E itself too: a resumed run continues bit for bit
                state["weight_avg"] = self._avg.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps = int(state["steps"])
        if self._avg is None:
            return
        if not self.of_weights:
            self._avg.load_state(state["avg"])
        elif "weight_avg" in state:
            self._avg.load_state(state["weight_avg"])
        else:  # a checkpoint that kept u: E = W - (1 - alpha) / alpha u
            u = [t.to(w.device) for t, w in zip(state["avg"], self.params)]
            self._avg.copy_from(torch._foreach_add(self.params, u, alpha=-(1.0 - self.alpha) / self.alpha))

    def update_average(self) -> list[Tensor]:
        """u, the EMA of applied updates (not bias-corrected), as new tensors."""
        assert self._avg is not None
        if not self.of_weights:
            return self._avg.state()
        if self.steps == 0:  # E is not set before the first update
            return [torch.zeros_like(w) for w in self.params]
        return torch._foreach_mul(torch._foreach_sub(self.params, self._avg.views), self.alpha / (1.0 - self.alpha))
