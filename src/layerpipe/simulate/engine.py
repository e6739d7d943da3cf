"""An event-driven list scheduler: one worker per stage, each op starts when its worker is
free and its inputs have arrived.

    >>> from layerpipe.simulate.costs import StageCosts
    >>> c = StageCosts.uniform(2, forward=1.0, backward=2.0)
    >>> order = {0: [Op(0, "F", 0), Op(0, "B", 0), Op(0, "W", 0)], 1: [Op(1, "F", 0), Op(1, "B", 0), Op(1, "W", 0)]}
    >>> t = run(c, StaticPolicy(order), deps=pipeline_deps(2))
    >>> t.finish[Op(0, "W", 0)]
    6.0

Ops are `F` (forward), `B` (input gradient), `W` (weight gradient), `U` (optimizer update;
its index is the update's number). A policy decides, per stage, what runs next: a fixed
order (`StaticPolicy`) or a choice among what is ready (`GreedyPolicy`). Dependencies
across stages pay the boundary's transfer time; within a stage they are free.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from layerpipe.errors import LayerpipeError
from layerpipe.simulate.costs import StageCosts


class Op(NamedTuple):
    stage: int
    kind: str  # F, B, W or U
    index: int  # microbatch (F, B, W) or update number (U)

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.index}"


Deps = Callable[[Op], Iterable[Op]]


def pipeline_deps(num_stages: int, split: bool = False) -> Deps:
    """The data dependencies of a pipeline: F(k,m) <- F(k-1,m); B(k,m) <- F(k,m) and the
    gradient from stage k+1; W(k,m) <- B(k,m). With `split` (zero-bubble) that gradient is
    sent after B(k+1,m); without, after the whole backward W(k+1,m), as autograd does when
    it computes a stage's input and weight gradients in one call. A U's dependencies are
    the stage's own earlier ops (the policy's order)."""
    last = num_stages - 1
    upstream = "B" if split else "W"

    def deps(op: Op) -> Iterable[Op]:
        k, kind, m = op
        if kind == "F":
            if k > 0:
                yield Op(k - 1, "F", m)
        elif kind == "B":
            yield Op(k, "F", m)
            if k < last:
                yield Op(k + 1, upstream, m)
        elif kind == "W":
            yield Op(k, "B", m)

    return deps


@dataclass
class Timeline:
    """What ran where and when."""

    num_stages: int
    start: dict[Op, float] = field(default_factory=dict)
    finish: dict[Op, float] = field(default_factory=dict)
    order: dict[int, list[Op]] = field(default_factory=dict)

    def busy(self, k: int, t0: float = float("-inf"), t1: float = float("inf")) -> float:
        """Seconds stage k computed inside [t0, t1]."""
        return sum(max(0.0, min(self.finish[o], t1) - max(self.start[o], t0)) for o in self.order[k])

    @property
    def makespan(self) -> float:
        return max(self.finish.values(), default=0.0)


class Policy:
    """Chooses each stage's next op. `extra_deps(op)` adds dependencies (a U's gradients)."""

    def done(self, k: int) -> bool:
        raise NotImplementedError

    def choose(self, k: int, now: float, sim: Simulation) -> tuple[Op, float] | None:
        """(op, start time >= now) to run next on stage k, or None: wait for an event."""
        raise NotImplementedError

    def commit(self, op: Op) -> None:
        """`op` was scheduled."""

    def extra_deps(self, op: Op) -> Iterable[Op]:
        return ()


class StaticPolicy(Policy):
    """Each stage runs its list in order (a list schedule)."""

    def __init__(self, order: dict[int, list[Op]], extra: Deps | None = None) -> None:
        self.order = order
        self.pos = {k: 0 for k in order}
        self._extra = extra

    def done(self, k: int) -> bool:
        return self.pos[k] >= len(self.order[k])

    def choose(self, k: int, now: float, sim: Simulation) -> tuple[Op, float] | None:
        op = self.order[k][self.pos[k]]
        ready = sim.ready_time(op)
        return None if ready is None else (op, max(now, ready))

    def commit(self, op: Op) -> None:
        self.pos[op.stage] += 1

    def extra_deps(self, op: Op) -> Iterable[Op]:
        return self._extra(op) if self._extra else ()


class Simulation:
    def __init__(self, costs: StageCosts, policy: Policy, deps: Deps) -> None:
        self.costs, self.policy, self._deps = costs, policy, deps
        self.timeline = Timeline(costs.num_stages, order={k: [] for k in range(costs.num_stages)})
        self._ready: dict[Op, float] = {}
        self.events: list[float] = []  # sorted times at which some op's output becomes available

    def deps(self, op: Op) -> list[Op]:
        return [*self._deps(op), *self.policy.extra_deps(op)]

    def duration(self, op: Op) -> float:
        c, k = self.costs, op.stage
        return {"F": c.forward, "B": c.backward_input, "W": c.backward_weight}[op.kind][k] if op.kind != "U" \
            else c.update_time(k)

    def arrival(self, dep: Op, consumer: int) -> float | None:
        """When `dep`'s output is usable on stage `consumer` (None: not scheduled yet)."""
        f = self.timeline.finish.get(dep)
        if f is None:
            return None
        if dep.stage != consumer:
            f += self.costs.transfer_time(min(dep.stage, consumer))
        return f

    def ready_time(self, op: Op) -> float | None:
        """When every input of `op` is on its stage (None: some input is not scheduled yet)."""
        known = self._ready.get(op)
        if known is not None:
            return known
        t = 0.0
        for d in self.deps(op):
            a = self.arrival(d, op.stage)
            if a is None:
                return None
            t = max(t, a)
        self._ready[op] = t  # fixed from now on: its inputs are all placed
        return t

    def ready_at(self, op: Op, now: float) -> bool:
        r = self.ready_time(op)
        return r is not None and r <= now + 1e-12

    def _record(self, op: Op, start: float) -> None:
        tl = self.timeline
        if op in tl.finish:
            raise LayerpipeError(f"op {op} scheduled twice")
        end = start + self.duration(op)
        tl.start[op], tl.finish[op] = start, end
        tl.order[op.stage].append(op)
        bisect.insort(self.events, end)
        for b in (op.stage - 1, op.stage):  # its arrival on either neighbour
            if 0 <= b < len(self.costs.transfer) and self.costs.transfer[b] > 0:
                bisect.insort(self.events, end + self.costs.transfer[b])

    def run(self) -> Timeline:
        k_all = range(self.costs.num_stages)
        free = {k: 0.0 for k in k_all}
        heap = [(0.0, k) for k in k_all if not self.policy.done(k)]
        heapq.heapify(heap)
        while heap:
            now = heap[0][0]
            group = []  # every stage free at `now`: any of them may unblock the others
            while heap and heap[0][0] <= now:
                group.append(heapq.heappop(heap)[1])
            progressed, waiting = False, []
            for k in sorted(group):
                choice = self.policy.choose(k, now, self)
                if choice is None:
                    waiting.append(k)
                    continue
                op, start = choice
                self._record(op, start)
                self.policy.commit(op)
                progressed = True
                free[k] = self.timeline.finish[op]
                if not self.policy.done(k):
                    heapq.heappush(heap, (free[k], k))
            if not waiting:
                continue
            if progressed:  # the ops just placed may free the waiting stages at `now`
                for k in waiting:
                    heapq.heappush(heap, (now, k))
                continue
            # nobody could start at `now`: wake the waiting stages at the next event
            i = bisect.bisect_right(self.events, now + 1e-12)
            later = [self.events[i]] if i < len(self.events) else []
            later += [t for t, _ in heap if t > now]
            if not later:
                stuck = ", ".join(f"stage {k}" for k in waiting)
                raise LayerpipeError(f"the schedule deadlocks at t={now:g} ({stuck} wait for work never scheduled)")
            nxt = min(later)
            for k in waiting:
                heapq.heappush(heap, (nxt, k))
        return self.timeline


def run(costs: StageCosts, policy: Policy, deps: Deps) -> Timeline:
    """Simulate `policy` on `costs` and return the timeline."""
    return Simulation(costs, policy, deps).run()
