"""Build the tick schedule of method.md sec 3 as data: `{tick: [Action, ...]}`.

    >>> ticks = build_schedule(2, 3, "layerpipe")     # delays 2, 0
    >>> {t: [str(a) for a in acts] for t, acts in ticks.items()}
    {0: ['0F0'], 1: ['0F1', '1F0', '1B0'], 2: ['0F2', '0B0', '1F1', '1B1'], 3: ['0B1', '1F2', '1B2'], 4: ['0B2']}

The ticks come from `schedule.timing.Timing`, the same tick rule both engines execute:
microbatch m enters at tick m; stage k runs its forward at tick m + k and its backward (and
the update with that gradient) at tick m + k + d_k (`sync`: everything at tick m); ticks go
on without new microbatches until every backward is done. Within a tick, actions are listed
by stage and, in a stage, forward before backward, the order the stage runs them in.
"""
from __future__ import annotations

from collections.abc import Sequence

from layerpipe.errors import PlanError
from layerpipe.plan.delays import SCHEDULES, stage_delays
from layerpipe.schedule.actions import Action
from layerpipe.schedule.timing import Timing

TickSchedule = dict[int, list[Action]]
"""Actions per tick, every tick from 0 to the last backward present (possibly empty)."""


def resolve_timing(num_stages: int, delays: Sequence[int] | str) -> Timing:
    """The timing of per-stage delays given as a list, or as a schedule name ("layerpipe",
    "pipedream": the delay rule; "sync": no pipelining)."""
    if num_stages < 1:
        raise PlanError(f"need at least one stage, got {num_stages}")
    if isinstance(delays, str):
        if delays == "sync":
            return Timing((0,) * num_stages, synchronous=True)
        if delays not in SCHEDULES:
            raise PlanError(f"unknown schedule {delays!r}; choose one of: {', '.join((*SCHEDULES, 'sync'))}")
        return Timing.from_delays(stage_delays(num_stages, delays))
    values = [int(d) for d in delays]
    if len(values) != num_stages:
        raise PlanError(f"{len(values)} delays given for {num_stages} stages")
    if any(d < 0 for d in values):
        raise PlanError(f"delays must be >= 0, got {values}")
    return Timing.from_delays(values)


def build_schedule(num_stages: int, num_microbatches: int, delays: Sequence[int] | str | Timing) -> TickSchedule:
    """The actions of every tick for `num_microbatches` microbatches through `num_stages`
    stages with per-stage `delays` (a list, a schedule name, or a `Timing`)."""
    if num_microbatches < 1:
        raise PlanError(f"need at least one microbatch, got {num_microbatches}")
    timing = delays if isinstance(delays, Timing) else resolve_timing(num_stages, delays)
    n = num_microbatches
    ticks: TickSchedule = {}
    for t in range(timing.length(n)):
        acts = ticks[t] = []
        for k in range(num_stages):
            for kind, i in (("F", timing.forward(k, t, n)), ("B", timing.backward(k, t, n))):
                if i is not None:
                    acts.append(Action(k, kind, i))
    return ticks


def stage_rows(ticks: TickSchedule, num_stages: int) -> dict[int, list[list[Action]]]:
    """The same schedule as `{stage: [actions of that stage in tick t, for every t]}`."""
    rows: dict[int, list[list[Action]]] = {k: [[] for _ in ticks] for k in range(num_stages)}
    for t, acts in ticks.items():
        for a in acts:
            rows[a.stage][t].append(a)
    return rows
