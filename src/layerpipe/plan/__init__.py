"""Plan a pipeline: partition layers into stages, derive per-stage delays, check legality."""
from layerpipe.plan.delays import SCHEDULES, downstream_stages, layer_delays, stage_delays
from layerpipe.plan.partition import balanced_partition, resolve_partition

__all__ = ["SCHEDULES", "balanced_partition", "downstream_stages", "layer_delays", "resolve_partition", "stage_delays"]
