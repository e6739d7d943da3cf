"""The interface every weight strategy implements: which weights the backward pass sees.

A stage's forward always runs on its current weights. Its backward, `d` ticks later, needs
the weights that forward used; the optimizer has changed them since. A strategy is told
about every forward (`record_forward` returns a version number), wraps every optimizer
step (`before_update`, `after_update`) and, when the backward runs, returns one tensor per
parameter to stand in for the parameters autograd saved (`backward_weights`). It reports
the bytes it holds for weight history, counted from the tensors it keeps, and declares how
many versions of the stage's weights that is (`history_versions`, the planner's formula).

A strategy whose work around a step is a copy or a lerp of its buffer toward the weights
also states it as data (`update_passes`, `BufferPass`), so a fused update
(`layerpipe.engine.fused`) can run those passes and the optimizer step in one loop per tensor.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor



@dataclass(frozen=True)
class BufferPass:
    """buffers[i] <- lerp(buffers[i], params[i], weight) for every parameter; `weight` None:
    a copy of the parameters (what lerp with weight 1 means, without its rounding)."""

    buffers: list[Tensor]
    weight: float | None = None

    def run(self, params: Sequence[Tensor]) -> None:
        if not self.buffers:
            return
        if self.weight is None:
            torch._foreach_copy_(self.buffers, list(params))
        else:
            torch._foreach_lerp_(self.buffers, list(params), self.weight)


def run_pass(step: BufferPass | None, params: Sequence[Tensor]) -> None:
    if step is not None:
        step.run(params)


class WeightStrategy:
    """Base class: no weight history at all (the backward sees the current weights)."""

    name: ClassVar[str] = "base"
    #: False for measurement tools that cannot be saved in a checkpoint
    checkpointable: ClassVar[bool] = True
    #: True when `backward_weights` reads the optimizer's state (a copy of the strategy
    #: without the optimizer, as the distributed runtime keeps for a tied parameter, differs)
    reads_optimizer: ClassVar[bool] = False
    #: True when `backward_weights` always returns the live weights (`params`): the engine
    #: then keeps no reference per saved parameter (cheaper saved-tensor hooks)
    live_backward: ClassVar[bool] = False
    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.params = [p.detach() for p in params]  # detached aliases: see in-place updates, no autograd
        self.delay = delay
        self.optimizer = optimizer
        self.version = 0  # number of optimizer steps applied to this stage

    @staticmethod
    def history_versions(delay: int) -> int:
        """How many copies of a stage's weights this strategy holds at gradient delay `delay`
        (steady state; the planner multiplies it by the stage's parameter bytes)."""
        return 0

    # -- hooks called by the engine ------------------------------------------------------
    def record_forward(self) -> int:
        """A forward is about to run on the current weights; return their version number."""
        return self.version

    def backward_weights(self, version: int) -> list[Tensor]:
        """Tensors standing in for the parameters in the backward of a forward at `version`:
        per parameter, the parameter itself (`params[i]`) or a tensor of its shape that owns
        its storage (the engine may swap that storage into the parameter's for the length of
        the backward; a view into a shared buffer is copied first, which costs a pass)."""
        return self.params

    def release(self, version: int) -> None:
        """The backward of the forward at `version` is done."""

    def before_update(self) -> None:
        """Called right before the optimizer steps."""

    def after_update(self) -> None:
        """Called right after the optimizer stepped."""
        self.version += 1

    def update_passes(self) -> tuple[BufferPass | None, BufferPass | None] | None:
        """For a fused update: do the bookkeeping of `before_update` and `after_update` now,
        and return their work on buffers as (before the step, after it) instead of running
        it; the caller runs the passes and the step, in that order. None (nothing done): the
        strategy cannot say so, and the caller calls the pair around the step. Here: the base
        hooks' work, no pass (a subclass that changes a hook states its own, or gets None:
        `__init_subclass__`)."""
        self.after_update()
        return None, None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a class that changes an update hook without restating its passes must not inherit
        # its parent's: they would skip the new hook's work. It keeps the unfused update.
        own = vars(cls)
        if ("before_update" in own or "after_update" in own) and "update_passes" not in own:
            cls.update_passes = _no_passes  # type: ignore[method-assign]

    def skip_update(self) -> None:
        """Called instead of the pair above on a tick whose optimizer step leaves the weights
        as they are (an accumulation adding a gradient): no new version. Versions count
        updates, not ticks, and the engine builds the strategy with the delay in updates,
        ceil(d_k / A) for one update every A ticks."""

    def updates_since(self, version: int) -> int:
        return self.version - version

    # -- reporting and checkpoints --------------------------------------------------------
    def history_bytes(self) -> int:
        """Bytes held for weight history (not counting the live parameters)."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])


def _no_passes(self: WeightStrategy) -> None:
    """`update_passes` of a strategy whose hooks are no passes over a buffer."""
    return None
