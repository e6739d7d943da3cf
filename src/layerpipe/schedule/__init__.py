"""The tick schedule as data: actions like `2F5`, the builder of method.md sec 3, and views.

    >>> from layerpipe.schedule import build_schedule, format_grid
    >>> ticks = build_schedule(num_stages=4, num_microbatches=8, delays="layerpipe")
    >>> print(format_grid(ticks, 4))                      # doctest: +SKIP
"""
from layerpipe.schedule.actions import Action
from layerpipe.schedule.builder import TickSchedule, build_schedule, resolve_timing, stage_rows
from layerpipe.schedule.timing import Timing
from layerpipe.schedule.view import format_grid, save_png

__all__ = ["Action", "TickSchedule", "Timing", "build_schedule", "format_grid", "resolve_timing", "save_png", "stage_rows"]
