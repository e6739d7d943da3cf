"""The single-process engine: runs the LayerPipe tick schedule exactly, on CPU or one GPU.

    pipe = Pipeline(model, stages=[1, 3, 2, 1], weights="ema",
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    for x, y in batches:
        pipe.step(x, y)    # one tick
    pipe.flush()           # drain

Tick semantics (method.md section 3): microbatch m entering at tick e runs its forward on
stage k at tick e + k and its backward at tick e + k + d_k; within a tick every stage does
its forward, then its backward, then applies that backward's gradient. Forwards are run
first stage to last and backwards last to first, which gives the same numbers as any other
order (a stage's work touches only its own weights) and lets a gradient cross a boundary in
the same tick when d_k = d_{k+1} + 1 (the PipeDream 1F1B timing).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerpipe.engine.stage import LossFn, Stage
from layerpipe.errors import LayerpipeError, PlanError, TrainingDiverged
from layerpipe.plan import resolve_partition, stage_delays
from layerpipe.plan.costs import param_costs
from layerpipe.plan.layers import module_layers
from layerpipe.weights import STRATEGIES, make_strategy

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


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

    def loss_values(self) -> list[float]:
        return [float(v) for v in self.losses.values()]


def check_delays(delays: Sequence[int]) -> list[int]:
    """Delays the tick engine can run: a backward needs the next stage's gradient no later
    than its own tick, so d_k >= d_{k+1} + 1, and the last stage needs d >= 0."""
    out = [int(d) for d in delays]
    if out and out[-1] < 0:
        raise PlanError(f"stage {len(out) - 1} has a negative delay {out[-1]}")
    for k in range(len(out) - 1):
        if out[k] < out[k + 1] + 1:
            raise PlanError(
                f"stage {k} has delay {out[k]} but its gradient arrives from stage {k + 1} "
                f"(delay {out[k + 1]}) no earlier than delay {out[k + 1] + 1}"
            )
    return out


def plan_stages(
    model: nn.Sequential,
    stages: int | Sequence[int] | None,
    weights: str,
    schedule: str = "layerpipe",
    delays: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """(layers per stage, delay per stage) of a pipeline: the one place both engines (this
    one and `engine.distributed`) derive them, so they always split a model the same way."""
    if not isinstance(model, nn.Sequential):
        raise PlanError(f"the model must be an nn.Sequential of layers, got {type(model).__name__}")
    if weights not in STRATEGIES:
        raise LayerpipeError(f"unknown weight strategy {weights!r}; choose one of: {', '.join(STRATEGIES)}")
    # the same balance as `layerpipe plan` shows: parameter counts per layer
    costs = param_costs(module_layers(model))
    sizes = resolve_partition(len(model), stages, costs=costs)
    num_stages = len(sizes)
    if delays is None:
        delays = stage_delays(num_stages, schedule)
    elif len(delays) != num_stages:
        raise PlanError(f"{len(delays)} delays given for {num_stages} stages")
    return sizes, [0] * num_stages if weights == "sync" else check_delays(delays)


class Pipeline:
    """Pipelined training of an `nn.Sequential` split into stages, in one process.

    Args:
        model: the network; its parameters are trained in place.
        stages: layer counts per stage, an int K (K stages balanced by parameter count), or
            None (one layer per stage).
        weights: `sync`, `stash`, `ema`, `latest`, or another of `layerpipe.weights.STRATEGIES`.
        optimizer: factory called once per stage with that stage's parameters.
        loss_fn: `loss_fn(output, target)` on the last stage's output.
        schedule: `layerpipe` (d_k = 2 S(k)) or `pipedream` (d_k = S(k)).
        delays: explicit per-stage delays in ticks, overriding `schedule`.
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
    ) -> None:
        self.stage_sizes, self.delays = plan_stages(model, stages, weights, schedule, delays)
        num_stages = len(self.stage_sizes)
        self.model = model
        self.weights = weights
        self.schedule = schedule
        self.synchronous = weights == "sync"
        self.loss_fn = loss_fn
        optimizer = optimizer or default_optimizer
        self.stages: list[Stage] = []
        start = 0
        for k, size in enumerate(self.stage_sizes):
            module = model[start : start + size]  # shares the model's layers
            start += size
            self.stages.append(
                Stage(
                    k,
                    module,
                    self.delays[k],
                    lambda ps, d, opt: make_strategy(weights, ps, d, opt),
                    optimizer,
                    is_last=k == num_stages - 1,
                    loss_fn=loss_fn,
                )
            )
        self.tick = 0
        # activations waiting at each stage's input: stage -> {microbatch: tensor}
        self._inbox: list[dict[int, Tensor]] = [{} for _ in self.stages]
        # gradients waiting at each stage's output: stage -> {microbatch: tensor}
        self._grads: list[dict[int, Tensor]] = [{} for _ in self.stages]
        self._targets: dict[int, Tensor] = {}
        self._entry: dict[int, int] = {}  # microbatch -> tick it entered
        self._next_mb = 0
        log.info("pipeline: stages %s, delays %s, weights %s", self.stage_sizes, self.delays, weights)

    # -- public API ---------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def step(self, x: Tensor, y: Tensor) -> TickInfo:
        """One tick in which microbatch (x, y) enters the pipeline."""
        mb = self._next_mb
        self._next_mb += 1
        if self.synchronous:
            return self._sync_step(mb, x, y)
        self._inbox[0][mb] = x
        self._targets[mb] = y
        self._entry[mb] = self.tick
        return self._run_tick()

    def flush(self) -> list[TickInfo]:
        """Ticks without input until every in-flight gradient has been applied."""
        infos = []
        while self.in_flight():
            infos.append(self._run_tick())
        return infos

    def in_flight(self) -> int:
        """Microbatches entered whose last backward has not run yet."""
        return len(self._entry)

    def weight_history_bytes(self) -> int:
        """Bytes the weight strategies hold right now for past weights."""
        return sum(s.strategy.history_bytes() for s in self.stages)

    def parameter_bytes(self) -> int:
        return sum(s.parameter_bytes() for s in self.stages)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; only between ticks with nothing in flight."""
        if self.in_flight():
            raise RuntimeError("flush() the pipeline before taking a checkpoint")
        return {"tick": self.tick, "next_mb": self._next_mb, "stages": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["stages"]) != self.num_stages:
            raise LayerpipeError(f"checkpoint has {len(state['stages'])} stages, the pipeline {self.num_stages}")
        self.tick, self._next_mb = int(state["tick"]), int(state["next_mb"])
        for stage, s in zip(self.stages, state["stages"]):
            stage.load_state_dict(s)

    # -- the tick -------------------------------------------------------------------------------
    def _run_tick(self) -> TickInfo:
        t = self.tick
        info = TickInfo(t, staleness=[None] * self.num_stages)
        last = self.num_stages - 1
        for k, stage in enumerate(self.stages):
            mb = self._due(k, t, 0, self._inbox[k])
            if mb is None:
                continue
            x = self._inbox[k].pop(mb)
            if k == last:
                info.losses[mb] = stage.forward(mb, x, self._targets.pop(mb))
            else:
                self._inbox[k + 1][mb] = stage.forward(mb, x)
        for k in range(last, -1, -1):
            stage = self.stages[k]
            mb = self._due(k, t, stage.delay, stage.inflight)
            if mb is None:
                continue
            info.staleness[k] = stage.strategy.updates_since(stage.inflight[mb].version)
            grad = stage.backward(mb, None if k == last else self._grads[k].pop(mb))
            if k > 0:
                self._grads[k - 1][mb] = grad
            else:
                del self._entry[mb]
            stage.update()
        info.weight_history_bytes = self.weight_history_bytes()
        self.tick += 1
        return info

    def _due(self, k: int, t: int, delay: int, waiting: dict[int, Any]) -> int | None:
        """The microbatch whose action on stage k falls in tick t, if it is waiting there."""
        for mb in waiting:
            if self._entry[mb] + k + delay == t:
                return mb
        return None

    def _sync_step(self, mb: int, x: Tensor, y: Tensor) -> TickInfo:
        """Ordinary training: forward, backward and update of one microbatch."""
        for p in self.model.parameters():
            p.grad = None
        loss = self.loss_fn(self.model(x), y)
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(f"the loss of microbatch {mb} is {loss.item()}; training stopped")
        loss.backward()
        for stage in self.stages:
            stage.update()
        info = TickInfo(self.tick, {mb: loss.detach()}, [0 if s.optimizer else None for s in self.stages])
        self.tick += 1
        return info
