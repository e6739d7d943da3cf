"""The one object the planner hands an engine: how many stages, their delays and the schedule.

    spec = sequential_spec(model, stages=4, schedule="layerpipe")   # an nn.Sequential
    spec.stage_sizes, spec.delays                                   # (1, 1, 2, 1), (6, 4, 2, 0)
    spec = PipelineSpec(stage_sizes=(1, 1), delays=(0, 0), schedule="sync")

Both engines (one process, one process per stage) and the schedule chart take a
`PipelineSpec`; it is checked once, on construction (`check_delays`). A model split at named
submodules (`layerpipe.split`) yields the same object with `split_points` set instead of
layer counts meaning slices of a Sequential.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from layerpipe.errors import PlanError
from layerpipe.plan.costs import param_costs
from layerpipe.plan.delays import SCHEDULES, stage_delays
from layerpipe.plan.layers import module_layers
from layerpipe.plan.partition import resolve_partition

#: schedules an engine runs: the two delay rules, `sync` (no pipelining: every stage's
#: forward, backward and update of a microbatch in one tick) and `custom` (delays given)
ENGINE_SCHEDULES = (*SCHEDULES, "sync", "custom")


def check_delays(delays: Sequence[int]) -> list[int]:
    """The one legality check of per-stage delays for the tick engines: a stage's backward
    needs the next stage's gradient no later than its own tick, so d_k >= d_{k+1} + 1, and
    the last stage needs d >= 0. (`plan.retiming.verify_delays` explains a plan's delays
    layer by layer; it allows surplus delay on the update edge, which no engine runs.)"""
    out = [int(d) for d in delays]
    if not out:
        raise PlanError("a pipeline needs at least one stage")
    if out[-1] < 0:
        raise PlanError(f"stage {len(out) - 1} has a negative delay {out[-1]}")
    for k in range(len(out) - 1):
        if out[k] < out[k + 1] + 1:
            raise PlanError(
                f"stage {k} has delay {out[k]} but its gradient arrives from stage {k + 1} "
                f"(delay {out[k + 1]}) no earlier than delay {out[k + 1] + 1}"
            )
    return out


@dataclass(frozen=True)
class PipelineSpec:
    """Stages, delays and schedule of a pipeline, validated on construction."""

    #: units per stage: layers of an nn.Sequential, or 1 per stage for a split model
    stage_sizes: tuple[int, ...]
    #: gradient delay of each stage, in ticks (all 0 for `sync`)
    delays: tuple[int, ...]
    #: one of ENGINE_SCHEDULES
    schedule: str = "layerpipe"
    #: for models split at named submodules: where stages 1..K-1 begin
    split_points: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_sizes", tuple(int(s) for s in self.stage_sizes))
        object.__setattr__(self, "delays", tuple(int(d) for d in self.delays))
        if self.schedule not in ENGINE_SCHEDULES:
            raise PlanError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(ENGINE_SCHEDULES)}")
        if not self.stage_sizes or any(s < 1 for s in self.stage_sizes):
            raise PlanError(f"every stage needs at least one layer, got {list(self.stage_sizes)}")
        if len(self.delays) != len(self.stage_sizes):
            raise PlanError(f"{len(self.delays)} delays given for {len(self.stage_sizes)} stages")
        if self.synchronous:
            if any(self.delays):
                raise PlanError(f"the sync schedule has no delays, got {list(self.delays)}")
        else:
            check_delays(self.delays)
        if self.split_points and len(self.split_points) != self.num_stages - 1:
            raise PlanError(f"{len(self.split_points)} split points for {self.num_stages} stages")

    @property
    def num_stages(self) -> int:
        return len(self.stage_sizes)

    @property
    def synchronous(self) -> bool:
        return self.schedule == "sync"

    def bounds(self) -> list[tuple[int, int]]:
        """(first, end) layer index of each stage."""
        out, start = [], 0
        for n in self.stage_sizes:
            out.append((start, start + n))
            start += n
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"stage_sizes": list(self.stage_sizes), "delays": list(self.delays), "schedule": self.schedule,
                "split_points": list(self.split_points)}


def make_spec(
    num_units: int,
    stages: int | Sequence[int] | None,
    schedule: str = "layerpipe",
    delays: Sequence[int] | None = None,
    costs: Sequence[float] | None = None,
) -> PipelineSpec:
    """Partition `num_units` layers into stages (see `resolve_partition`) and give each stage
    its delay: the schedule's delay rule, zeros for `sync`, or `delays` (schedule `custom`)."""
    sizes = resolve_partition(num_units, stages, costs=costs)
    if delays is not None:
        if schedule == "sync":
            raise PlanError("the sync schedule takes no delays")
        return PipelineSpec(tuple(sizes), tuple(delays), "custom")
    if schedule == "sync":
        return PipelineSpec(tuple(sizes), (0,) * len(sizes), "sync")
    if schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}; choose one of: {', '.join((*SCHEDULES, 'sync'))}")
    return PipelineSpec(tuple(sizes), tuple(stage_delays(len(sizes), schedule)), schedule)


def sequential_spec(
    model: Any,
    stages: int | Sequence[int] | None,
    schedule: str = "layerpipe",
    delays: Sequence[int] | None = None,
) -> PipelineSpec:
    """The spec of an `nn.Sequential` (the same balance `layerpipe plan` shows: parameter
    counts per layer)."""
    from torch import nn  # lazy: the planner stays importable without torch

    if not isinstance(model, nn.Sequential):
        raise PlanError(f"the model must be an nn.Sequential of layers, got {type(model).__name__} "
                        "(split other models with split_points=[...])")
    return make_spec(len(model), stages, schedule, delays, costs=param_costs(module_layers(model)))


def split_spec(
    split_points: Sequence[str],
    schedule: str = "layerpipe",
    delays: Sequence[int] | None = None,
) -> PipelineSpec:
    """The spec of a model cut at named submodules (`layerpipe.split`): one unit per stage,
    the delays of `schedule` (or `delays`), and the split points recorded."""
    k = len(split_points) + 1
    spec = make_spec(k, [1] * k, schedule, delays)
    return PipelineSpec(spec.stage_sizes, spec.delays, spec.schedule, tuple(split_points))
