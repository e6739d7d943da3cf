"""`ema`: the LayerPipe2 reconstruction. Rebuild past weights instead of storing them.

    W_then = W_now - (sum of the n updates applied since that forward) ~= W_now - n * u_hat

u is an exponential moving average of the applied updates dW = W(t+1) - W(t), with a
pipeline-aware decay tied to the stage's delay, alpha_k = 2 / (d_k + 1) (centre of mass
(d_k - 1) / 2 updates back: the middle of the window of the last d_k updates), and start-up
bias correction u_hat = u / (1 - beta^t). n comes from an exact version counter. Memory: one
buffer per parameter of stages with d_k > 0, so at most |W| whatever the depth. It averages
applied updates, not gradients, so it works with any optimizer.

How u is kept (same numbers up to float rounding, ~1e-7 relative): for 32- and 64-bit
weights, through E, the EMA of the weights themselves, E <- (1 - alpha) E + alpha W(t+1),
started at E = W when the first update comes. Then u = alpha / (1 - alpha) (W - E) exactly
(both obey the same recursion), and the rebuilt weights are R = W + c (E - W), c = n alpha /
((1 - alpha) (1 - beta^t)). The buffer holds R itself, for the n the next backward is expected
to need (n = d_k, the steady state), so the backward reads it as it is, and two passes in place
keep it per update: before the optimizer step R <- lerp(R, W, 1 - 1/c) (back to E), after it R <-
lerp(R, W, 1 - c' (1 - alpha)) (the EMA update and the next rebuild in one). In-place passes
cost less than writing the rebuild out of place each backward (`benchmarks/ema_passes.py`:
the passes 0.6-0.8x the time on this CPU). A backward at another n (the pipeline filling, a
tied parameter's other user) gets new tensors: the buffer's values never depend on who read it,
so one process and a pipeline of processes compute the same numbers.
With alpha = 1 (d = 1) the average is the last update, and the buffer is simply the weights
before it (exact). Under gradient accumulation (one update every A ticks) d_k counts updates,
ceil(d_ticks / A) (the engine builds the strategy so), and a tick that only adds a gradient is
no update: at most one update between a forward and its backward makes the rebuild exact. 16-bit weights with alpha < 1 (E would round small updates away) keep u
itself and rebuild into new tensors.
The two passes are `BufferPass`es (`update_passes`), so a fused update (`engine.fused`) runs
them and the optimizer step in one loop per tensor: the buffer and the weights read once.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.weights.base import BufferPass, WeightStrategy, run_pass
from layerpipe.weights.flat import FlatBuffer
from layerpipe.weights.registry import register_strategy

#: what the buffer of a delayed stage holds (module docstring)
REBUILT, PREVIOUS, UPDATES = "rebuilt", "previous", "updates"


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
        if self.alpha >= 1.0:
            self.mode = PREVIOUS
        elif any(p.element_size() < 4 for p in self.params):
            self.mode = UPDATES
        else:
            self.mode = REBUILT
        self._before: list[Tensor] | None = None
        # a stage whose backward runs in the tick of its forward (d = 0) never needs history;
        # one tensor per parameter (the engine swaps its storage into the parameter's)
        self._avg = FlatBuffer(self.params, zero=True, separate=True) if delay > 0 and self.params else None
        #: REBUILT: the buffer holds W + c (E - W) for this c (1: E itself)
        self._c = 1.0

    def _scale(self, n: float) -> float:
        """n * u_hat = scale * u (PREVIOUS, UPDATES) or scale * (E - W) (REBUILT: scale = -c)."""
        correction = 1.0 - (1.0 - self.alpha) ** self.steps
        if self.mode == REBUILT:
            return -n * self.alpha / ((1.0 - self.alpha) * correction)
        return n / correction

    def backward_weights(self, version: int) -> list[Tensor]:
        n = self.version - version
        if n == 0 or self._avg is None or self.steps == 0:
            return self.params
        params, buf = self.params, self._avg.views
        if self.mode == REBUILT:
            c = -self._scale(n)
            if c == self._c:  # the steady state: n = d_k
                return buf
            # another n (the pipeline filling, a tied parameter's other user): new tensors,
            # the buffer untouched, so its values never depend on who read it
            return torch._foreach_lerp(params, buf, c / self._c)
        if self.mode == PREVIOUS and n == 1:
            return buf
        if self.mode == PREVIOUS:  # W - n (W - W_prev): more than one update back (not in a steady pipeline)
            return torch._foreach_lerp(params, buf, float(n))
        return torch._foreach_add(params, buf, alpha=-self._scale(n))

    def shift_(self, targets: list[Tensor], n: float) -> bool:
        """targets += n * u_hat, in place; `targets` must alias the live weights (`params`).
        False (nothing done) before the first update. For a compensation that predicts the
        weights n updates ahead from this average (zero extra bytes)."""
        if self._avg is None or self.steps == 0:
            return False
        if self.mode == REBUILT:  # E - W = (buffer - W) / c
            torch._foreach_lerp_(targets, self._avg.views, self._scale(n) / self._c)
        elif self.mode == PREVIOUS:  # u = W - W_prev
            torch._foreach_lerp_(targets, self._avg.views, -float(n))
        else:
            torch._foreach_add_(targets, self._avg.views, alpha=self._scale(n))
        return True

    def before_update(self) -> None:
        if self.mode == UPDATES and self._avg is not None:
            # transient copy of W(t): 16-bit weights need the exact dW = W(t+1) - W(t)
            self._before = torch._foreach_mul(self.params, 1.0)
            return
        run_pass(self._before_pass(), self.params)

    def after_update(self) -> None:
        if self.mode == UPDATES and self._avg is not None:
            super().after_update()
            self.steps += 1
            assert self._before is not None
            delta = torch._foreach_sub(self.params, self._before)
            self._before = None
            torch._foreach_lerp_(self._avg.views, delta, self.alpha)
            return
        run_pass(self._after_pass(), self.params)

    def update_passes(self) -> tuple[BufferPass | None, BufferPass | None] | None:
        if self.mode == UPDATES and self._avg is not None:  # dW itself: not a pass over the buffer
            return None
        return self._before_pass(), self._after_pass()

    def _before_pass(self) -> BufferPass | None:
        """REBUILT and PREVIOUS: the work before the step, with its bookkeeping done."""
        if self._avg is None:
            return None
        if self.mode == PREVIOUS:
            return BufferPass(self._avg.views)
        if self.steps == 0:  # E starts at the weights: no update averaged yet, u = 0
            self._c = 1.0
            return BufferPass(self._avg.views)
        if self._c != 1.0:  # back to E while W is still W(t)
            weight = 1.0 - 1.0 / self._c
            self._c = 1.0
            return BufferPass(self._avg.views, weight)
        return None

    def _after_pass(self) -> BufferPass | None:
        """REBUILT and PREVIOUS: the work after the step, with its bookkeeping done."""
        super().after_update()
        if self._avg is None:
            return None
        self.steps += 1
        if self.mode != REBUILT:
            return None
        # E' = lerp(E, W, alpha), then W + c (E' - W) = lerp(E, W, 1 - c (1 - alpha)): one
        # pass, for the n of the steady state, d_k updates since the forward
        c = -self._scale(self.delay)
        self._c = c
        return BufferPass(self._avg.views, 1.0 - c * (1.0 - self.alpha))

    @staticmethod
    def history_versions(delay: int) -> int:
        return 1 if delay > 0 else 0

    def history_bytes(self) -> int:
        return self._avg.nbytes if self._avg is not None else 0

    def _weight_average(self) -> list[Tensor]:
        """REBUILT: E, as new tensors."""
        assert self._avg is not None
        if self._c == 1.0:
            return self._avg.state()
        return torch._foreach_lerp(self._avg.views, self.params, 1.0 - 1.0 / self._c)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["steps"] = self.steps
        if self._avg is not None:
            state["avg"] = self.update_average()
            if self.mode == REBUILT and self.steps:  # the buffer as it is: a resumed run continues bit for bit
                state["rebuilt"], state["rebuilt_c"] = self._avg.state(), self._c
            if self.mode == PREVIOUS and self.steps:
                state["previous"] = self._avg.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps = int(state["steps"])
        if self._avg is None:
            return
        self._c = 1.0
        if self.mode == UPDATES:
            self._avg.load_state(state["avg"])
        elif self.mode == PREVIOUS:
            if "previous" in state:
                self._avg.load_state(state["previous"])
            else:  # a checkpoint that kept u: W_prev = W - u
                u = [t.to(w.device) for t, w in zip(state["avg"], self.params)]
                self._avg.copy_from(torch._foreach_sub(self.params, u))
        elif "rebuilt" in state:
            self._avg.load_state(state["rebuilt"])
            self._c = float(state["rebuilt_c"])
        elif "weight_avg" in state:  # an older checkpoint: E
            self._avg.load_state(state["weight_avg"])
        else:  # a checkpoint that kept u: E = W - (1 - alpha) / alpha u
            u = [t.to(w.device) for t, w in zip(state["avg"], self.params)]
            self._avg.copy_from(torch._foreach_add(self.params, u, alpha=-(1.0 - self.alpha) / self.alpha))

    def update_average(self) -> list[Tensor]:
        """u, the EMA of applied updates (not bias-corrected), as new tensors."""
        assert self._avg is not None
        if self.mode == UPDATES:
            return self._avg.state()
        if self.steps == 0:  # nothing averaged before the first update
            return [torch.zeros_like(w) for w in self.params]
        if self.mode == PREVIOUS:
            return torch._foreach_sub(self.params, self._avg.views)
        return torch._foreach_mul(torch._foreach_sub(self.params, self._weight_average()), self.alpha / (1.0 - self.alpha))
