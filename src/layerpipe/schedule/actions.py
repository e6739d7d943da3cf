"""One unit of pipeline work as printable data: `2F5` is stage 2's forward of microbatch 5.

    >>> a = Action.parse("2B3")
    >>> a.stage, a.kind, a.microbatch, str(a)
    (2, 'B', 3, '2B3')

The notation is torch.distributed.pipelining's (`1F0`): stage, computation, microbatch. `B`
is the backward of that microbatch followed by the update with its gradient (method.md
sec 3: one update per stage per tick, right after the backward).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from layerpipe.errors import PlanError

KINDS = ("F", "B")
_PATTERN = re.compile(r"^\s*(\d+)\s*([FB])\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Action:
    """Stage `stage` runs computation `kind` ("F" or "B") on microbatch `microbatch`."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(f"unknown action kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if self.stage < 0 or self.microbatch < 0:
            raise PlanError(f"stage and microbatch must be >= 0, got {self.stage} and {self.microbatch}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """The inverse of `str(action)`."""
        match = _PATTERN.match(text)
        if match is None:
            raise PlanError(f"cannot parse action {text!r}: expected STAGE, F or B, MICROBATCH as in '2F5'")
        return cls(int(match.group(1)), match.group(2), int(match.group(3)))
