"""`stash`: exact weight stashing (PipeDream). Keeps every version an in-flight backward needs.

Copy on update: a version is copied into a buffer only when the optimizer is about to
overwrite weights that a pending backward still needs. With one forward per tick, stage k
then holds exactly d_k versions in steady state (sum_k d_k |W_k| = (K-1)|W| for equal stages).
Freed buffers are reused, so steady state allocates nothing. A tick whose step changes
nothing (gradient accumulation, `skip_update`) makes no new version: with one update every A
ticks a stage holds ceil(d_k / A) versions (its delay in updates). Each version keeps one tensor per
parameter (`FlatBuffer(separate=True)`): the engine swaps a version's storage into the
parameters for its backward, in O(1), instead of copying it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.weights.base import BufferPass, WeightStrategy, run_pass
from layerpipe.weights.flat import FlatBuffer
from layerpipe.weights.registry import register_strategy


@register_strategy
class Stash(WeightStrategy):
    """exact stored versions (PipeDream weight stashing), d_k copies of the stage's weights"""

    name = "stash"

    def __init__(self, params: Sequence[Tensor], delay: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        super().__init__(params, delay, optimizer)
        self._pending: Counter[int] = Counter()  # version -> backwards still to run
        self._saved: dict[int, FlatBuffer] = {}
        self._free: list[FlatBuffer] = []
        # every buffer mirrors `params`: the history is a count of buffers (read every tick)
        self._buffer_bytes = sum(p.numel() * p.element_size() for p in self.params)

    def record_forward(self) -> int:
        self._pending[self.version] += 1
        return self.version

    def backward_weights(self, version: int) -> list[Tensor]:
        if version == self.version:
            return self.params
        return self._saved[version].views

    def release(self, version: int) -> None:
        self._pending[version] -= 1
        if self._pending[version] <= 0:
            del self._pending[version]
            buf = self._saved.pop(version, None)
            if buf is not None:
                self._free.append(buf)

    def before_update(self) -> None:
        run_pass(self._save_version(), self.params)

    def update_passes(self) -> tuple[BufferPass | None, BufferPass | None]:
        before = self._save_version()
        self.after_update()
        return before, None

    def _save_version(self) -> BufferPass | None:
        """The copy that keeps the current version, where a pending backward needs it."""
        if self._pending.get(self.version, 0) > 0 and self.version not in self._saved:
            buf = self._free.pop() if self._free else FlatBuffer(self.params, separate=True)
            self._saved[self.version] = buf
            return BufferPass(buf.views)
        return None

    @staticmethod
    def history_versions(delay: int) -> int:
        return delay

    def history_bytes(self) -> int:
        return (len(self._saved) + len(self._free)) * self._buffer_bytes

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "pending": dict(self._pending),
            "saved": {v: b.state() for v, b in self._saved.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self._pending = Counter({int(k): int(v) for k, v in state["pending"].items()})
        self._saved, self._free = {}, []
        for v, tensors in state["saved"].items():
            buf = FlatBuffer(self.params, separate=True)
            buf.load_state(tensors)
            self._saved[int(v)] = buf

