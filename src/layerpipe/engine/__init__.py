"""Execution: `single.Pipeline` (all stages in one process) and `distributed` (one process per
stage), both built from `stage.Stage` and the tick rule of `layerpipe.schedule.Timing`."""
