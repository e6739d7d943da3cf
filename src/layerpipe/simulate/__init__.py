"""Simulate pipeline schedules from per-stage costs: throughput, bubble, peak memory.

    >>> from layerpipe.simulate import StageCosts, simulate
    >>> costs = StageCosts.uniform(4, forward=1.0, backward=2.0, update=0.1)
    >>> r = simulate(costs, "layerpipe", microbatches=8)
    >>> round(r.throughput, 4), r.bubble            # 1 / (F + B + U): no bubble
    (0.3226, 0.0)

Pure Python (no torch at import); `layerpipe.simulate.profile` measures costs with torch.
"""
from layerpipe.simulate.costs import AllReduce, StageCosts
from layerpipe.simulate.engine import Op, Timeline
from layerpipe.simulate.schedules import ASYNC_SCHEDULES, SCHEDULES, SYNC_SCHEDULES, SimResult, simulate

__all__ = ["ASYNC_SCHEDULES", "AllReduce", "Op", "SCHEDULES", "SYNC_SCHEDULES", "SimResult", "StageCosts",
           "Timeline", "simulate"]
