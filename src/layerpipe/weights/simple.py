"""`latest`: no weight history; the backward uses the current weights, whatever the forward used.

(Synchronous training is not a strategy but a schedule: `schedule="sync"` runs every stage's
forward, backward and update of a microbatch in one tick, so nothing is ever stale.)
"""
from __future__ import annotations

from layerpipe.weights.base import WeightStrategy
from layerpipe.weights.registry import register_strategy


@register_strategy
class Latest(WeightStrategy):
    """no correction: the backward uses the current weights"""

    name = "latest"
    live_backward = True
