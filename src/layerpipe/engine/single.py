"""The single-process engine: runs the tick schedule exactly, on CPU or one GPU.

    pipe = Pipeline(model, stages=[1, 3, 2, 1], weights="ema",
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    for x, y in batches:
        pipe.step(x, y)    # one tick
    pipe.flush()           # drain

The tick rule is `schedule.Timing` (method.md section 3): microbatch i of a segment enters at
tick i, stage k runs its forward at tick i + k and its backward at tick i + k + d_k; within a
tick every stage does its forward, then its backward, then applies that backward's gradient.
Forwards are run first stage to last and backwards last to first, which gives the same
numbers as any other order (a stage's work touches only its own weights) and lets a gradient
cross a boundary in the same tick when d_k = d_{k+1} + 1 (PipeDream's 1F1B timing) or under
`sync` (every stage, one microbatch, one tick: ordinary training).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerpipe.engine.checks import check_arguments, check_first_batch, checked_optimizer
from layerpipe.engine.stage import LossFn, OptimizerFactory, Stage, build_stages, sequential_modules
from layerpipe.errors import LayerpipeError
from layerpipe.plan import PipelineSpec, sequential_spec
from layerpipe.schedule import Timing
from layerpipe.weights import strategy_class

log = logging.getLogger(__name__)

def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@dataclass
class TickInfo:
    """What happened in one tick."""

    tick: int
    #: microbatch id -> detached loss tensor, for every microbatch whose loss was computed
    losses: dict[int, Tensor] = field(default_factory=dict)
    #: per stage: updates the stage had applied between the forward and the backward of the
    #: gradient it applied this tick (None: no update this tick)
    staleness: list[int | None] = field(default_factory=list)
    #: bytes the weight strategies held for past weights at the end of the tick
    weight_history_bytes: int = 0


def resolve_strategy(weights: str, schedule: str) -> tuple[str, str]:
    """(strategy, schedule): `weights="sync"` is shorthand for the `sync` schedule, under which
    nothing is ever stale, so the strategy that keeps no history (`latest`) is exact."""
    if weights == "sync" or schedule == "sync":
        if weights not in ("sync", "latest"):
            raise LayerpipeError(f"the sync schedule needs no weight strategy; got weights={weights!r}")
        return "latest", "sync"
    strategy_class(weights)  # one line for an unknown name
    return weights, schedule


class Pipeline:
    """Pipelined training of an `nn.Sequential` split into stages, in one process.

    Args:
        model: the network; its parameters are trained in place.
        stages: layer counts per stage, an int K (K stages balanced by parameter count), or
            None (one layer per stage).
        weights: a registered weight strategy (`layerpipe.weights.strategy_names()`:
            `stash`, `ema`, `latest`, ...), or `sync` for ordinary training.
        optimizer: factory called once per stage with that stage's parameters.
        loss_fn: `loss_fn(output, target)` on the last stage's output.
        schedule: `layerpipe` (d_k = 2 S(k)), `pipedream` (d_k = S(k)) or `sync`.
        delays: explicit per-stage delays in ticks, overriding `schedule`.
        weight_options: keyword options of the strategy (e.g. {"alpha": 0.3} for `ema`).
        compensation: delay compensation, a list of specs of `layerpipe.compensate` (e.g.
            ["nesterov", "predict:c=0.5"]): techniques that build or wrap each stage's
            optimizer knowing its delay; anything they keep counts in the history bytes.
    """

    def __init__(
        self,
        model: nn.Sequential,
        stages: int | Sequence[int] | None = None,
        weights: str = "ema",
        optimizer: OptimizerFactory | None = None,
        loss_fn: LossFn = F.cross_entropy,
        schedule: str = "layerpipe",
        delays: Sequence[int] | None = None,
        weight_options: Mapping[str, Any] | None = None,
        compensation: Sequence[Any] | None = None,
    ) -> None:
        check_arguments(model, stages, weights, optimizer, loss_fn, schedule, delays, weight_options)  # once
        strategy, schedule = resolve_strategy(weights, schedule)
        self.spec = sequential_spec(model, stages, schedule, delays)
        self.timing = Timing.of(self.spec)
        self.model = model
        self.weights = weights
        self.loss_fn = loss_fn
        self.stages = build_stages(sequential_modules(model, self.spec), self.spec, strategy,
                                   checked_optimizer(optimizer or default_optimizer), loss_fn, weight_options,
                                   compensation=compensation)
        self.tick = 0
        # activations waiting at each stage's input, gradients at each stage's output:
        # stage -> {microbatch: tensor}
        self._inbox: list[dict[int, Tensor]] = [{} for _ in self.stages]
        self._grads: list[dict[int, Tensor]] = [{} for _ in self.stages]
        self._targets: dict[int, Tensor] = {}
        self._next_mb = 0
        # the current segment (see schedule.timing): its first tick and microbatch, its size
        self._segment_tick = 0
        self._segment_mb = 0
        self._entered = 0
        self._done = 0
        log.info("pipeline: stages %s, delays %s, weights %s", list(self.spec.stage_sizes), list(self.spec.delays),
                 weights)

    # -- public API ---------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stage_sizes(self) -> list[int]:
        return list(self.spec.stage_sizes)

    @property
    def delays(self) -> list[int]:
        return list(self.spec.delays)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer | None]:
        """Every stage's optimizer, in stage order (None: a stage without parameters)."""
        return [s.optimizer for s in self.stages]

    def step(self, x: Tensor, y: Tensor) -> TickInfo:
        """One tick in which microbatch (x, y) enters the pipeline."""
        if self._next_mb == 0:  # the first microbatch only: shapes, dtypes, the loss
            check_first_batch(self.model, self.loss_fn, x, y)
        if not self.in_flight():  # a new segment starts with this microbatch
            self._segment_tick, self._segment_mb, self._entered, self._done = self.tick, self._next_mb, 0, 0
        mb = self._next_mb
        self._next_mb += 1
        self._entered += 1
        self._inbox[0][mb] = x
        self._targets[mb] = y
        return self._run_tick()

    def flush(self) -> list[TickInfo]:
        """Ticks without input until every in-flight gradient has been applied."""
        infos = []
        while self.in_flight():
            infos.append(self._run_tick())
        return infos

    def in_flight(self) -> int:
        """Microbatches entered whose last backward has not run yet."""
        return self._entered - self._done

    def weight_history_bytes(self) -> int:
        """Bytes the weight strategies hold right now for past weights."""
        return sum(s.history_bytes() for s in self.stages)

    def parameter_bytes(self) -> int:
        return sum(s.parameter_bytes() for s in self.stages)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; only between ticks with nothing in flight."""
        if self.in_flight():
            raise LayerpipeError("flush() the pipeline before taking a checkpoint")
        return {"tick": self.tick, "next_mb": self._next_mb, "stages": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["stages"]) != self.num_stages:
            raise LayerpipeError(f"checkpoint has {len(state['stages'])} stages, the pipeline {self.num_stages}")
        self.tick, self._next_mb = int(state["tick"]), int(state["next_mb"])
        for stage, s in zip(self.stages, state["stages"]):
            stage.load_state_dict(s)

    # -- the tick -------------------------------------------------------------------------------
    def _run_tick(self) -> TickInfo:
        t = self.tick - self._segment_tick  # tick within the segment
        n, base, timing = self._entered, self._segment_mb, self.timing
        info = TickInfo(self.tick, staleness=[None] * self.num_stages)
        last = self.num_stages - 1
        for k, stage in enumerate(self.stages):
            i = timing.forward(k, t, n)
            if i is None:
                continue
            mb = base + i
            x = self._inbox[k].pop(mb)
            if k == last:
                info.losses[mb] = stage.forward(mb, x, self._targets.pop(mb))
            else:
                self._inbox[k + 1][mb] = stage.forward(mb, x)
        for k in range(last, -1, -1):
            stage = self.stages[k]
            i = timing.backward(k, t, n)
            if i is None:
                continue
            mb = base + i
            info.staleness[k] = stage.strategy.updates_since(stage.inflight[mb].version)
            grad = stage.backward(mb, None if k == last else self._grads[k].pop(mb))
            if k > 0:
                self._grads[k - 1][mb] = grad
            else:
                self._done += 1
            stage.update()
        info.weight_history_bytes = self.weight_history_bytes()
        self.tick += 1
        return info
