"""The LayerPipe2 delay rule: Delay(l) = 2 S(l) ticks, S(l) = stages downstream of layer l."""
from __future__ import annotations

from collections.abc import Sequence

from layerpipe.errors import PlanError

SCHEDULES = ("layerpipe", "pipedream")


def downstream_stages(num_stages: int) -> list[int]:
    """S(k) = K - 1 - k for each stage k (0-based)."""
    if num_stages < 1:
        raise PlanError(f"need at least one stage, got {num_stages}")
    return [num_stages - 1 - k for k in range(num_stages)]


def stage_delays(num_stages: int, schedule: str = "layerpipe") -> list[int]:
    """Gradient delay of each stage in ticks: 2 S(k) for `layerpipe`, S(k) for `pipedream` (1F1B)."""
    if schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    factor = 2 if schedule == "layerpipe" else 1
    return [factor * s for s in downstream_stages(num_stages)]


def delay_in_updates(delay: int, every: int) -> int:
    """A delay of `delay` ticks counted in weight updates, one every `every` ticks (gradient
    accumulation): ceil(delay / every), the versions of the weights it spans."""
    return -(-delay // every)


def layer_delays(stage_sizes: Sequence[int], schedule: str = "layerpipe") -> list[int]:
    """Per-layer delays: every layer of a stage shares the stage's delay."""
    per_stage = stage_delays(len(stage_sizes), schedule)
    return [d for d, n in zip(per_stage, stage_sizes) for _ in range(n)]
