"""The tick rule, in one place: which microbatch stage k runs forward / backward in tick t.

    timing = Timing.of(spec)                  # from a plan.PipelineSpec
    timing.forward(k=1, t=3)                  # 2: microbatch 2 entered at tick 2
    timing.backward(k=0, t=7, n=8)            # microbatch 1 (delay 6): 7 - 0 - 6

Ticks and microbatches count from the start of a segment: microbatch i enters the pipeline at
tick i, and a segment ends when the pipeline has drained (method.md section 3). Stage k runs
the forward of microbatch t - k and the backward (then the update with its gradient) of
microbatch t - k - d_k; under `sync` every stage works on microbatch t, forwards first to
last, then backwards last to first, all in tick t. Both engines, the printable schedule and
the tests use this class, so a chart cannot disagree with a run.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """When stage k works in tick t (see the module docstring)."""

    delays: tuple[int, ...]
    synchronous: bool = False

    @classmethod
    def of(cls, spec: Any) -> Timing:
        """The timing of a `plan.PipelineSpec`."""
        return cls(tuple(spec.delays), spec.synchronous)

    @classmethod
    def from_delays(cls, delays: Sequence[int]) -> Timing:
        return cls(tuple(int(d) for d in delays), False)

    @property
    def num_stages(self) -> int:
        return len(self.delays)

    def forward(self, k: int, t: int, n: int | None = None) -> int | None:
        """Microbatch whose forward stage k runs in tick t (None: none, or not < n)."""
        i = t if self.synchronous else t - k
        return i if i >= 0 and (n is None or i < n) else None

    def backward(self, k: int, t: int, n: int | None = None) -> int | None:
        """Microbatch whose backward (and update) stage k runs in tick t."""
        i = t if self.synchronous else t - k - self.delays[k]
        return i if i >= 0 and (n is None or i < n) else None

    def backward_tick(self, k: int, i: int) -> int:
        """Tick of stage k's backward of microbatch i."""
        return i if self.synchronous else i + k + self.delays[k]

    def length(self, n: int) -> int:
        """Ticks from the first of n microbatches entering to the last gradient applied."""
        if n == 0:
            return 0
        return max(self.backward_tick(k, n - 1) for k in range(self.num_stages)) + 1

    @property
    def forward_lag(self) -> int:
        """Ticks between a stage's forward and the next stage's forward of a microbatch."""
        return 0 if self.synchronous else 1

    def gradient_slack(self, k: int) -> int:
        """Ticks from stage k+1's backward of a microbatch to stage k's: 1 for LayerPipe (the
        gradient register), 0 for PipeDream's 1F1B timing and `sync` (within the tick)."""
        return 0 if self.synchronous else self.delays[k] - self.delays[k + 1] - 1
