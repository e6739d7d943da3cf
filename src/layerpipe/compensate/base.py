"""The interface of a delay compensation: a per-stage wrapper around the stage's optimizer.

A compensation is built once per stage from the stage's parameters, its delay d_k (ticks
between a forward and the update its gradient makes) and the optimizer it wraps. The engine
treats it as the stage's optimizer: it calls `step()` once per tick (inside the weight
strategy's `before_update`/`after_update`, so the strategy sees, and `ema` averages, exactly
what the compensation applies), reads `param_groups` to set learning rates, checkpoints it
with `state_dict`/`load_state_dict`, and adds `history_bytes()` to the bytes it reports for
weight history. Techniques that act outside the update (forward weight prediction) also get
`attach(stage)` once the stage exists.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


def history_bytes(optimizer: Any) -> int:
    """Bytes a (possibly wrapped) optimizer keeps for delay compensation; 0 for plain ones."""
    fn = getattr(optimizer, "history_bytes", None)
    return int(fn()) if callable(fn) else 0


def update_period(optimizer: Any) -> int:
    """Ticks per weight update of an optimizer chain: A for one that accumulates A gradients
    into each update, else 1. A stage's weight strategy counts its versions in updates, so
    its delay is ceil(d_k / A) of them."""
    fn = getattr(optimizer, "update_period", None)
    return int(fn()) if callable(fn) else 1


def steps_now(optimizer: Any) -> bool:
    """Whether the optimizer's next `step()` may change the weights: False only on the ticks
    where an accumulating chain just adds the gradient (the weight strategy then keeps the
    version: `WeightStrategy.skip_update`); True for a plain optimizer. Never False where
    `update_period` is 1."""
    fn = getattr(optimizer, "steps_now", None)
    return bool(fn()) if callable(fn) else True


class Compensation:
    """Base wrapper: forwards everything to the wrapped optimizer and adds nothing."""

    name: ClassVar[str] = "none"

    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for p in params]
        self.delay = int(delay)
        self.optimizer = optimizer

    # -- the torch.optim.Optimizer surface the engine and lr schedules use -------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        self.optimizer.step()

    # -- stage hooks, reporting and checkpoints ----------------------------------------------
    def attach(self, stage: Any) -> None:
        """Called once with the engine's Stage after it is built; passed down the chain."""
        inner = getattr(self.optimizer, "attach", None)
        if callable(inner):
            inner(stage)

    def steps_now(self) -> bool:
        """Whether the next `step()` may change the weights (see `steps_now`); a wrapper that
        moves them on every tick of its own says True, and 1 for `update_period`."""
        return steps_now(self.optimizer)

    def update_period(self) -> int:
        return update_period(self.optimizer)

    def holds_grads(self) -> bool:
        """True when the stage must keep the parameters' gradients until the next tick (an
        accumulation summed in `.grad`); passed down the chain."""
        inner = getattr(self.optimizer, "holds_grads", None)
        return bool(inner()) if callable(inner) else False

    def own_bytes(self) -> int:
        """Bytes this wrapper itself keeps (buffers shared with the weight strategy excluded)."""
        return 0

    def history_bytes(self) -> int:
        return self.own_bytes() + history_bytes(self.optimizer)

    def own_state(self) -> dict[str, Any]:
        return {}

    def load_own_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "own": self.own_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_own_state(state["own"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(delay={self.delay}, optimizer={self.optimizer!r})"
