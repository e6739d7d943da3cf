"""The single-process engine: runs the tick schedule exactly, on CPU or one GPU.

    pipe = Pipeline(model, stages=[1, 3, 2, 1], weights="ema",
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    for x, y in batches:
        pipe.step(x, y)    # one tick
    pipe.flush()           # drain

    # any traceable model, cut at named submodules (layerpipe.split); inputs as the model takes them
    pipe = Pipeline(gpt2, split_points=["transformer.h.2"], weights="stash",
                    example_inputs={"input_ids": ids, "attention_mask": mask, "use_cache": False},
                    loss_fn=lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten()))
    pipe.step({"input_ids": ids, "attention_mask": mask, "use_cache": False}, labels)

The tick rule is `schedule.Timing` (method.md section 3): microbatch i of a segment enters at
tick i, stage k runs its forward at tick i + k and its backward at tick i + k + d_k; within a
tick every stage does its forward, then its backward, then applies that backward's gradient.
Forwards are run first stage to last and backwards last to first, which gives the same
numbers as any other order (a stage's work touches only its own weights; a tied parameter's
users all read it in their forwards, before its owner, the first of them, updates it after
their backwards) and lets a gradient
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

from layerpipe.engine.batch import as_call as _as_call
from layerpipe.engine.checks import check_arguments, check_first_batch, checked_optimizer
from layerpipe.engine.build import build_stages, sequential_modules
from layerpipe.engine.stage import LossFn, OptimizerFactory, SchedulerFactory, Stage
from layerpipe.errors import LayerpipeError, PlanError
from layerpipe.plan import sequential_spec, split_spec
from layerpipe.schedule import Timing
from layerpipe.weights import strategy_class

log = logging.getLogger(__name__)

#: mixed_precision= values -> the autocast dtype
AUTOCAST_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cut_model(model: nn.Module, stages: Any, split_points: Sequence[str] | None, example_inputs: Any):
    """`layerpipe.split.split_model` of a model at `split_points` or into `stages=K`, traced on
    `example_inputs` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments); what `Pipeline` and the distributed runtime both run."""
    if example_inputs is None:
        raise PlanError(f"a {type(model).__name__} is not an nn.Sequential of layers: pass example_inputs= (one "
                        "call of the model) with split_points=[...] or stages=K to split it")
    if split_points is not None:
        if stages is not None:
            raise PlanError("give split_points or stages, not both")
        if isinstance(split_points, str):
            raise PlanError(f"split_points is a list of submodule names, got the string {split_points!r}")
        request: dict[str, Any] = {"split_points": list(split_points)}
    elif isinstance(stages, int) and not isinstance(stages, bool):
        request = {"num_stages": stages}
    else:
        raise PlanError(f"a {type(model).__name__} (not an nn.Sequential) is split with split_points=[...] or "
                        f"stages=K, got stages={stages!r}")
    from layerpipe.split import split_model

    args, kwargs = _as_call(example_inputs)
    return split_model(model, **request, example_args=args, example_kwargs=kwargs)


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
    """Pipelined training of a model split into stages, in one process.

    Args:
        model: the network; its parameters are trained in place. An `nn.Sequential` is cut
            into slices of layers (`stages`); any other model (or a Sequential given
            `split_points`) is cut by `layerpipe.split.split_model` at named submodules.
        stages: for an nn.Sequential, layer counts per stage, an int K (K stages balanced by
            parameter count), or None (one layer per stage); for other models an int K (split
            points chosen automatically, balanced by parameter count).
        weights: a registered weight strategy (`layerpipe.weights.strategy_names()`:
            `stash`, `ema`, `latest`, ...), or `sync` for ordinary training.
        optimizer: factory called once per stage with the parameters that stage owns (a
            parameter read by several stages, such as a tied embedding, is owned by the first).
        loss_fn: `loss_fn(output, target)` on whatever the model returns.
        schedule: `layerpipe` (d_k = 2 S(k)), `pipedream` (d_k = S(k)) or `sync`.
        delays: explicit per-stage delays in ticks, overriding `schedule`.
        weight_options: keyword options of the strategy (e.g. {"alpha": 0.3} for `ema`).
        split_points: qualified submodule names where stages 1..K-1 begin, e.g.
            ["transformer.h.2"] (any model `split_model` can trace).
        example_inputs: one call of the model (a tensor, a tuple of positional arguments or a
            dict of keyword arguments) to trace and cut it with; required with `split_points`
            or a model that is not an nn.Sequential. Non-tensor arguments (`use_cache=False`)
            are fixed at these values.
        mixed_precision: "bf16" or "fp16": each stage's forward and the loss run under
            `torch.autocast` (the weight strategies stay exact: the backward repeats the
            forward's casts on the version it uses). No loss scaling is done for "fp16".
        clip_grad_norm: clip each stage's gradient (of the parameters it owns) to this norm
            before its optimizer steps.
        lr_scheduler: factory called once per stage with that stage's optimizer, e.g.
            `lambda opt: torch.optim.lr_scheduler.StepLR(opt, 100)`; each scheduler is stepped
            after every update of its stage (one per tick in steady state).
        compensation: delay compensation, a list of specs of `layerpipe.compensate` (e.g.
            ["nesterov", "predict:c=0.5"]): techniques that build or wrap each stage's
            optimizer knowing its delay; anything they keep counts in the history bytes.
        fused_update: run each stage's update (the weight strategy's copy or lerps of its
            buffer and the optimizer step) as one loop per tensor compiled by torch.compile:
            every tensor read once per update instead of once per pass (`engine.fused`).
            torch.optim.SGD, Adam or AdamW, without `compensation`; stages under 1 MiB of
            parameters stay unfused (a compiled call's fixed cost); needs a C++ compiler on a
            CPU, and each stage's first update compiles (seconds).
    """

    def __init__(
        self,
        model: nn.Module,
        stages: int | Sequence[int] | None = None,
        weights: str = "ema",
        optimizer: OptimizerFactory | None = None,
        loss_fn: LossFn = F.cross_entropy,
        schedule: str = "layerpipe",
        delays: Sequence[int] | None = None,
        weight_options: Mapping[str, Any] | None = None,
        *,
        split_points: Sequence[str] | None = None,
        example_inputs: Any = None,
        mixed_precision: str | None = None,
        clip_grad_norm: float | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        compensation: Sequence[Any] | None = None,
        fused_update: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise PlanError(f"the model must be an nn.Sequential of layers or another nn.Module with split_points, "
                            f"got {type(model).__name__}")
        sequential = isinstance(model, nn.Sequential) and split_points is None
        if sequential:  # split models are checked by the splitter
            check_arguments(model, stages, weights, optimizer, loss_fn, schedule, delays, weight_options)  # once
        strategy, schedule = resolve_strategy(weights, schedule)
        if mixed_precision not in AUTOCAST_DTYPES:
            raise LayerpipeError(f"mixed_precision must be one of {', '.join(map(str, AUTOCAST_DTYPES))}, "
                                 f"got {mixed_precision!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise LayerpipeError(f"clip_grad_norm must be a positive number, got {clip_grad_norm!r}")
        self.model = model
        self.weights = weights
        self.loss_fn = loss_fn
        self.split = None  # the layerpipe.split.SplitModel of a model cut at split points
        device = next((p.device.type for p in model.parameters()), "cpu")
        dtype = AUTOCAST_DTYPES[mixed_precision]
        self._stage_options: dict[str, Any] = {
            "autocast": (device, dtype) if dtype is not None else None,
            "clip_grad_norm": clip_grad_norm, "lr_scheduler": lr_scheduler, "compensation": compensation,
            "fused_update": bool(fused_update),
        }
        self._build_args = (strategy, checked_optimizer(optimizer or default_optimizer), loss_fn, weight_options)
        self.stages: list[Stage] = []
        self.tick = 0
        self._next_mb = 0
        # the current segment (see schedule.timing): its first tick and microbatch, its size
        self._segment_tick = 0
        self._segment_mb = 0
        self._entered = 0
        self._done = 0
        self._targets: dict[int, Any] = {}
        if sequential:
            self.spec = sequential_spec(model, stages, schedule, delays)
            self._build(sequential_modules(model, self.spec))
            return
        self.split = cut_model(model, stages, split_points, example_inputs)
        self.spec = split_spec(self.split.split_points, schedule, delays)
        self._build(self.split.stages)

    def _build(self, modules: Sequence[nn.Module]) -> None:
        strategy, optimizer, loss_fn, weight_options = self._build_args
        self.timing = Timing.of(self.spec)
        self.stages = build_stages(modules, self.spec, strategy, optimizer, loss_fn, weight_options,
                                   **self._stage_options)
        # activations waiting at each stage's input, gradients at each stage's output:
        # stage -> {microbatch: tensor or tuple}
        self._inbox: list[dict[int, Any]] = [{} for _ in self.stages]
        self._grads: list[dict[int, Any]] = [{} for _ in self.stages]
        log.info("pipeline: stages %s, delays %s, weights %s, split points %s", list(self.spec.stage_sizes),
                 list(self.spec.delays), self.weights, list(self.spec.split_points))

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
        """Every stage's optimizer, in stage order (None: a stage that owns no parameters).
        Each holds the parameters its stage owns; change a learning rate with
        `for g in pipe.optimizers[k].param_groups: g["lr"] = ...`."""
        return [s.optimizer for s in self.stages]

    @property
    def lr_schedulers(self) -> list[Any]:
        """Every stage's learning-rate scheduler (None where none was made)."""
        return [s.scheduler for s in self.stages]

    def step(self, x: Any, y: Any) -> TickInfo:
        """One tick in which microbatch (x, y) enters the pipeline. `x` is what the model
        takes: a tensor, a tuple of positional arguments or a dict of keyword arguments."""
        if self.split is not None:  # check the call before any state changes
            args, kwargs = _as_call(x)
            try:
                self.split.stages[0]._flatten(args, kwargs)
            except TypeError as exc:
                raise LayerpipeError(f"the inputs do not fit the model's call: {exc}") from None
        elif self._next_mb == 0:  # the first microbatch only: shapes, dtypes, the loss
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
