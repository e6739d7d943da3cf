"""The two strategies without history: `sync` (no pipelining; the reference) and `latest`."""
from __future__ import annotations

from layerpipe.weights.base import WeightStrategy


class Latest(WeightStrategy):
    """No correction: the backward uses the current weights, whatever the forward used."""

    name = "latest"


class Sync(WeightStrategy):
    """Ordinary synchronous training: the engine runs forward, backward and update of each
    microbatch at once, so forward and backward always see the same weights."""

    name = "sync"
    approximate = False
