"""Parameters tied across processes (GPT-2's `wte`, read by the embedding on stage 0 and the
LM head on the last stage) in the distributed runtime.

The single-process engine defines the numbers (`engine.stage`): the first stage that reads
a tied parameter owns it (its optimizer, its weight strategy, its update); a later stage
that reads it (a user) records its forwards with the owner's strategy, takes the version
for its backward from there, and hands its part of the gradient of microbatch m to the
owner, which adds the parts to its own gradient in its backward of m (always in the tick of
the user's backward or later: users come after the owner, and a later stage's backward of
m never comes after an earlier one's) and applies one update. Here the stages live in
different processes, so

- the owner posts, in each tick t, one receive per tied parameter for the part each user
  produces in tick t (after its receives of the gradient from stage k+1), waits for them
  just before its backward of that microbatch and adds them, users in descending stage
  order: the sum `Stage` makes in one process (`TiedGrads`), bit for bit;
- after each update the owner sends the new values to every user, and whether they
  changed (not on the ticks of a gradient accumulation: no new version); a user receives
  the values of tick t-1 before its forward of tick t (one tick of slack: it posts the
  receives at the end of tick t-1) and drains the last ones at the end of the epoch;
- a user keeps the parameter (its local copy) under its own replica of the owner's weight
  strategy (`RemoteOwner`: same strategy, same delay in updates, same options, no optimizer),
  told of every owner update (`before_update`, new values, `after_update`), so under
  `stash` or `ema` its backward sees the version its own forward used; what that replica
  holds counts in the stage's weight history bytes.

Per link the messages go in one order on both ends (activation, gradient, gradient part,
value, per tick); a part carries one more element, 1 or 0: whether the user's backward
reached the parameter at all (a parameter no user reached keeps no gradient, as in one
process). Data parallelism: replica j of a user talks to replica j of the owner; the owner
adds the parts before its gradient all-reduce, so the sum over replicas includes them, and
every replica applies the same update and sends the same values. Strategies that read the
optimizer's state (`momentum`) cannot be replicated without it: refused.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerpipe.compensate import chain_update_period
from layerpipe.engine.build import param_users
from layerpipe.engine.distributed.transport import TIED_GRAD, TIED_VALUE, Comm, Pending
from layerpipe.engine.saved import TiedGrads
from layerpipe.engine.stage import Stage
from layerpipe.errors import PlanError
from layerpipe.plan import PipelineSpec, delay_in_updates
from layerpipe.schedule import Timing
from layerpipe.weights import WeightStrategy, make_strategy, strategy_class

log = logging.getLogger(__name__)


@dataclass
class RemoteOwner:
    """This process's replica of stage `index`'s weight strategy over the tied parameters
    this stage reads from it (their local copies), as `Stage.link_tied` takes an owner."""

    index: int
    rank: int  # the owner's process (the same replica)
    strategy: WeightStrategy
    owned: list[nn.Parameter]


@dataclass
class UserLink:
    """A later stage that reads tied parameters this stage owns: which, in its order."""

    index: int
    rank: int
    params: list[nn.Parameter]


class TiedLinks:
    """The tied-parameter messages of one stage process (see the module docstring). The
    worker calls, in each tick t: `apply_values(t)` before the forward, `post_parts(t)`
    after posting its gradient receives, `take_parts(mb)` before and `send_parts(mb)` after
    the backward, `send_values()` after the update, `post_values(t)` at the end, and
    `end_epoch(last_tick)` after the last tick."""

    def __init__(self, comm: Comm, stage: Stage, modules: Sequence[nn.Module], spec: PipelineSpec, weights: str,
                 weight_options: Mapping[str, Any] | None = None, compensation: Sequence[Any] | None = None) -> None:
        self.comm, self.timing, self._stage = comm, Timing.of(spec), stage
        k, layout, replica = stage.index, comm.layout, comm.replica
        users = param_users(modules)

        def from_to(owner: int, user: int) -> list[nn.Parameter]:
            return [p for p in modules[user].parameters() if p.requires_grad and users[id(p)][0] == owner]

        self.users = [UserLink(u, layout.rank(u, replica), ps)
                      for u in range(k + 1, len(modules)) if (ps := from_to(k, u))]
        reads = {o: ps for o in range(k) if (ps := from_to(o, k))}
        if (reads or self.users) and strategy_class(weights).reads_optimizer:
            raise PlanError(f"weights {weights!r} reads the optimizer's state, which the other processes reading "
                            "a tied parameter do not have; choose stash or ema, or untie the parameters")
        options = dict(weight_options or {})
        # the owner's strategy counts its delay in updates: ceil(d_o / A_o), A_o the ticks per
        # update of the chain the owner builds from the same compensation specs
        specs, max_delay = list(compensation or []), max(spec.delays)
        self.owners = [RemoteOwner(o, layout.rank(o, replica),
                                   make_strategy(weights, ps, delay_in_updates(spec.delays[o], chain_update_period(
                                       specs, spec.delays[o], max_delay)), None, **options), ps)
                       for o, ps in reads.items()]
        self.grads = TiedGrads()
        self._n, self._base = 0, 0
        self._parts: dict[int, list[tuple[UserLink, list[Pending]]]] = {}  # microbatch -> posted
        self._values: dict[int, list[tuple[RemoteOwner, list[Pending]]]] = {}  # producer tick -> posted
        owned_tied = list({id(p): p for link in self.users for p in link.params}.values())
        if self.owners or owned_tied:
            owners: dict[int, Any] = {id(p): owner for owner in self.owners for p in owner.owned}
            owners.update({id(p): stage for p in owned_tied})
            stage.link_tied(owners, self.grads, owned_tied)
            log.info("stage %d: tied parameters owned here, read by stages %s; read here from stages %s", k,
                     [u.index for u in self.users], [o.index for o in self.owners])

    @property
    def active(self) -> bool:
        return bool(self.users or self.owners)

    def begin_epoch(self, n: int, base: int) -> None:
        """An epoch (segment) of `n` microbatches, the first numbered `base`."""
        self._n, self._base = n, base

    # -- owner side -------------------------------------------------------------------------
    def post_parts(self, t: int) -> None:
        """Post the receives of the gradient parts the users produce in tick t."""
        for link in self.users:
            i = self.timing.backward(link.index, t, self._n)
            if i is not None:
                posted = [self.comm.post_recv(link.rank, (p.numel() + 1,), p.dtype, TIED_GRAD) for p in link.params]
                self._parts.setdefault(self._base + i, []).append((link, posted))

    def take_parts(self, mb: int) -> None:
        """Collect the users' parts of microbatch `mb` for the stage's backward to add, in
        the order one process adds them (last user first)."""
        for link, posted in sorted(self._parts.pop(mb, []), key=lambda e: -e[0].index):
            for p, pending in zip(link.params, posted):
                buf = self.comm.wait(pending)
                if bool(buf[-1] != 0):  # the user's backward reached it
                    self.grads.add(mb, p, buf[:-1].view_as(p))

    def send_values(self) -> None:
        """After an update: the new values to every user (copies: the next update must not
        change a message in flight), then one element, 1 or 0: whether the update changed the
        weights (a tick of an accumulation does not, and makes no new version)."""
        if not self.users:
            return
        stepped = torch.ones(1) if self._stage.stepped else torch.zeros(1)
        for link in self.users:
            for p in link.params:
                self.comm.send(link.rank, p.detach().clone(), TIED_VALUE)
            self.comm.send(link.rank, stepped.to(self.comm.device), TIED_VALUE)

    # -- user side ----------------------------------------------------------------------------
    def send_parts(self, mb: int) -> None:
        """After the backward of `mb`: this stage's gradient parts to their owners."""
        for owner in self.owners:
            for p in owner.owned:
                g = self.grads.pop(mb, p)
                body = g.reshape(-1) if g is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                flag = torch.full((1,), 1.0 if g is not None else 0.0, dtype=body.dtype, device=body.device)
                self.comm.send(owner.rank, torch.cat([body, flag]), TIED_GRAD)

    def post_values(self, t: int) -> None:
        """End of tick t: post the receives of the values the owners' updates of tick t send."""
        for owner in self.owners:
            if self.timing.backward(owner.index, t, self._n) is not None:
                posted = [self.comm.post_recv(owner.rank, tuple(p.shape), p.dtype, TIED_VALUE) for p in owner.owned]
                posted.append(self.comm.post_recv(owner.rank, (1,), torch.float32, TIED_VALUE))  # stepped
                self._values.setdefault(t, []).append((owner, posted))

    def apply_values(self, t: int) -> None:
        """Before the forward of tick t: the owners' updates of tick t-1, each wrapped in the
        replica strategy's update hooks as the owner's optimizer step is in its own."""
        for owner, posted in self._values.pop(t - 1, []):
            *values, stepped = [self.comm.wait(p) for p in posted]
            if not bool(stepped[0] != 0):  # the owner's weights did not change
                owner.strategy.skip_update()
                continue
            owner.strategy.before_update()
            with torch.no_grad():
                for p, v in zip(owner.owned, values):
                    p.copy_(v)  # in place: the stage finds its parameters by storage
            owner.strategy.after_update()

    def end_epoch(self, ticks: int) -> None:
        """After the epoch's `ticks` ticks: apply the last values; nothing may be left."""
        self.apply_values(ticks)
        if self._parts or self._values or len(self.grads):  # a bug, not a user error
            raise RuntimeError("tied parameters: the epoch ended with gradient parts or values left over")

    # -- reporting and checkpoints --------------------------------------------------------------
    def history_bytes(self) -> int:
        """Bytes the replicas of the owners' strategies hold for past values."""
        return sum(o.strategy.history_bytes() for o in self.owners)

    def state_dict(self) -> list[dict[str, Any]]:
        return [o.strategy.state_dict() for o in self.owners]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        for owner, s in zip(self.owners, state):
            owner.strategy.load_state_dict(s)


__all__ = ["RemoteOwner", "TiedLinks", "UserLink"]
