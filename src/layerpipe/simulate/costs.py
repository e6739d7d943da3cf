"""Per-stage costs a simulation needs: times of each kind of work, and bytes held.

    >>> c = StageCosts.uniform(4, forward=1.0, backward=2.0, weight_grad=1.0, update=0.1)
    >>> c.num_stages, c.backward_input[0], c.backward_weight[0]
    (4, 1.0, 1.0)

Times are in seconds (any unit works: throughputs are then per that unit). `backward` is the
whole backward of a stage; `weight_grad` the part of it that computes weight gradients (W),
the rest is the input gradient (B) that the stage upstream waits for. Pure Python: no torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from layerpipe.errors import LayerpipeError


@dataclass(frozen=True)
class AllReduce:
    """Cost of the gradient all-reduce across data-parallel replicas, added to every update:
    `latency + bytes / bandwidth` seconds, bytes = the stage's gradient bytes (its weight
    bytes) times `factor` (2 (R-1)/R for a ring over R replicas; 1.0 as given)."""

    latency: float = 0.0
    """seconds per all-reduce call"""
    bandwidth: float = math.inf
    """bytes per second"""
    factor: float = 1.0
    """bytes moved per gradient byte (ring all-reduce: 2 (R-1)/R)"""

    def __post_init__(self) -> None:
        if self.latency < 0 or not self.bandwidth > 0 or self.factor < 0:
            raise LayerpipeError("all-reduce latency and factor must be >= 0 and bandwidth > 0")

    def time(self, nbytes: float) -> float:
        return self.latency + self.factor * nbytes / self.bandwidth


def _floats(values: float | Sequence[float], k: int, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        out = (float(values),) * k
    else:
        out = tuple(float(v) for v in values)
        if len(out) != k:
            raise LayerpipeError(f"{what}: {len(out)} values given for {k} stages")
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise LayerpipeError(f"{what} must be finite and >= 0, got {list(out)}")
    return out


@dataclass(frozen=True)
class StageCosts:
    """Times (seconds) and bytes of each of K pipeline stages.

    `transfer` is the time to move one microbatch's activation (or its gradient) across one
    stage boundary: K-1 values, or one for all. Memory: `weight_bytes`, `optimizer_bytes`
    per stage, `activation_bytes` per stage per microbatch in flight."""

    forward: tuple[float, ...]
    backward_input: tuple[float, ...]
    backward_weight: tuple[float, ...]
    update: tuple[float, ...]
    transfer: tuple[float, ...] = ()
    weight_bytes: tuple[float, ...] = ()
    optimizer_bytes: tuple[float, ...] = ()
    activation_bytes: tuple[float, ...] = ()
    allreduce: AllReduce | None = None
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def num_stages(self) -> int:
        return len(self.forward)

    @classmethod
    def make(
        cls,
        num_stages: int,
        *,
        forward: float | Sequence[float],
        backward: float | Sequence[float],
        weight_grad: float | Sequence[float] | None = None,
        update: float | Sequence[float] = 0.0,
        transfer: float | Sequence[float] = 0.0,
        weight_bytes: float | Sequence[float] = 0.0,
        optimizer_bytes: float | Sequence[float] = 0.0,
        activation_bytes: float | Sequence[float] = 0.0,
        allreduce: AllReduce | None = None,
        meta: dict | None = None,
    ) -> StageCosts:
        """Costs from per-stage values (a number: the same for every stage). `backward` is the
        whole backward; `weight_grad` its weight-gradient part (default: half of it)."""
        k = int(num_stages)
        if k < 1:
            raise LayerpipeError(f"need at least one stage, got {num_stages}")
        bwd = _floats(backward, k, "backward")
        wg = tuple(b / 2 for b in bwd) if weight_grad is None else _floats(weight_grad, k, "weight-grad")
        if any(w > b + 1e-12 for w, b in zip(wg, bwd)):
            raise LayerpipeError(f"weight-grad time {list(wg)} exceeds the whole backward {list(bwd)}")
        if isinstance(transfer, (int, float)):
            tr = (float(transfer),) * (k - 1)
        else:
            tr = _floats(transfer, k - 1, "transfer") if k > 1 else ()
        if any(not math.isfinite(v) or v < 0 for v in tr):
            raise LayerpipeError(f"transfer must be finite and >= 0, got {list(tr)}")
        return cls(
            forward=_floats(forward, k, "forward"),
            backward_input=tuple(b - w for b, w in zip(bwd, wg)),
            backward_weight=wg,
            update=_floats(update, k, "update"),
            transfer=tr,
            weight_bytes=_floats(weight_bytes, k, "weight bytes"),
            optimizer_bytes=_floats(optimizer_bytes, k, "optimizer bytes"),
            activation_bytes=_floats(activation_bytes, k, "activation bytes"),
            allreduce=allreduce,
            meta=dict(meta or {}),
        )

    @classmethod
    def uniform(cls, num_stages: int, **kwargs) -> StageCosts:
        """K identical stages (every keyword a number)."""
        return cls.make(num_stages, **kwargs)

    @classmethod
    def split_whole(cls, num_stages: int, **totals: float) -> StageCosts:
        """K stages with 1/K of the whole model's times and bytes each (a perfectly balanced
        partition), activations per microbatch included; `transfer` stays per boundary."""
        k = int(num_stages)
        if k < 1:
            raise LayerpipeError(f"need at least one stage, got {num_stages}")
        split = ("forward", "backward", "weight_grad", "update", "weight_bytes", "optimizer_bytes", "activation_bytes")
        per = {n: (v / k if n in split and v is not None else v) for n, v in totals.items()}
        return cls.make(k, **per)

    def update_time(self, k: int) -> float:
        """The update of stage k, with the data-parallel all-reduce when one is set."""
        extra = self.allreduce.time(self.weight_bytes[k]) if self.allreduce else 0.0
        return self.update[k] + extra

    def transfer_time(self, boundary: int) -> float:
        """Time across the boundary between stage `boundary` and `boundary + 1`."""
        return self.transfer[boundary] if self.transfer else 0.0

    def stage_time(self, k: int) -> float:
        """F + B + W + U of stage k: its busy time per microbatch when it updates every time."""
        return self.forward[k] + self.backward_input[k] + self.backward_weight[k] + self.update_time(k)

    def to_dict(self) -> dict:
        return {
            "forward": list(self.forward), "backward_input": list(self.backward_input),
            "backward_weight": list(self.backward_weight), "update": list(self.update),
            "transfer": list(self.transfer), "weight_bytes": list(self.weight_bytes),
            "optimizer_bytes": list(self.optimizer_bytes), "activation_bytes": list(self.activation_bytes),
            **({"allreduce": vars(self.allreduce)} if self.allreduce else {}),
            **({"meta": self.meta} if self.meta else {}),
        }
