"""The plan of a pipeline as data: stages, delays and weight-history memory per layer.

    >>> plan = make_plan(4)                                  # 4 anonymous layers, 1 per stage
    >>> [l.delay for l in plan.layers]
    [6, 4, 2, 0]
    >>> plan = make_plan(6, stages=[1, 2, 3], schedule="pipedream")
    >>> [l.delay for l in plan.layers]
    [2, 1, 1, 0, 0, 0]
    >>> make_plan("mlp", stages=2).stage_sizes              # doctest: +SKIP
    [1, 4]

Per layer l on stage k: S(l) = K-1-k, the delay d_k in ticks of the chosen schedule (2 S for
`layerpipe`, S for `pipedream`, or what the user gave), and what keeping weight history costs
(method.md sec 4): `stash` keeps d_k old versions (d_k * bytes of the layer's parameters),
`ema` one buffer when d_k > 0, `latest` nothing. Under gradient accumulation (one update every
A ticks) a version is an update, not a tick: the formulas take the delay in updates,
ceil(d_k / A) (what the engine builds each strategy with).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from layerpipe.errors import PlanError
from layerpipe.plan.costs import BALANCE_MODES, measure_layer_times, param_costs
from layerpipe.plan.delays import SCHEDULES, delay_in_updates, downstream_stages, stage_delays
from layerpipe.plan.layers import LayerInfo, LayerSource, describe_layers, load_model
from layerpipe.plan.partition import resolve_partition, stage_costs

log = logging.getLogger(__name__)

#: strategy name -> copies of a stage's weights it holds at delay d; the planner does not
#: know the strategies: the caller passes `layerpipe.weights.memory_formulas()`
MemoryFormulas = Mapping[str, Callable[[int], int]]


def history_bytes(param_bytes: int, delay: int, memory: MemoryFormulas) -> dict[str, int]:
    """Bytes of weight history each strategy holds for parameters of `param_bytes` bytes
    updated with a delay of `delay` updates (method.md sec 4), from each strategy's formula."""
    return {name: versions(delay) * param_bytes for name, versions in memory.items()}


@dataclass(frozen=True)
class LayerPlan:
    """One layer of the plan."""

    index: int
    """0-based position in forward order."""
    name: str
    kind: str
    params: int
    param_bytes: int
    stage: int
    """0-based stage."""
    downstream_stages: int
    """S(l) = K - 1 - stage."""
    delay: int
    """Ticks between this layer's forward of a microbatch and the update with its gradient."""
    required_delay: int
    """The least legal delay for the schedule (the delay rule); `delay` may exceed it."""
    stash_versions: int
    """Old weight versions exact stashing keeps: the delay in updates, ceil(d_k / accumulate)."""
    bytes: dict[str, int]
    """Weight-history bytes per strategy: stash, ema, latest."""


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: a contiguous run of layers sharing one delay."""

    stage: int
    layers: list[int]
    """0-based indices of its layers."""
    params: int
    param_bytes: int
    cost: float
    """Balance cost of the stage (parameters, seconds, or layers; see `Plan.cost_unit`)."""
    downstream_stages: int
    delay: int
    required_delay: int
    stash_versions: int
    bytes: dict[str, int]


@dataclass(frozen=True)
class Plan:
    """A complete pipeline plan; `to_dict()` is what `layerpipe plan --json` prints."""

    model: str | None
    """Model name, or None for anonymous or user-built layer lists."""
    schedule: str
    balance: str
    """How the partition was chosen: "given", "one-per-stage", "params" or "time"."""
    cost_unit: str
    layers: list[LayerPlan]
    stages: list[StagePlan]
    delays_given: bool
    """True when the delays came from the user instead of the delay rule."""
    accumulate: int = 1
    """Ticks per weight update (gradient accumulation); versions count updates."""

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def strategies(self) -> list[str]:
        """The strategies whose memory the plan shows."""
        return list(self.stages[0].bytes) if self.stages else []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def stage_sizes(self) -> list[int]:
        return [len(s.layers) for s in self.stages]

    @property
    def stage_delays(self) -> list[int]:
        return [s.delay for s in self.stages]

    def totals(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_stages": self.num_stages,
            "params": sum(s.params for s in self.stages),
            "param_bytes": sum(s.param_bytes for s in self.stages),
            "bottleneck_cost": max(s.cost for s in self.stages),
            "stash_versions": sum(s.stash_versions for s in self.stages),
            "bytes": {k: sum(s.bytes[k] for s in self.stages) for k in self.strategies},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "schedule": self.schedule,
            "balance": self.balance,
            "cost_unit": self.cost_unit,
            "num_layers": self.num_layers,
            "num_stages": self.num_stages,
            "stage_sizes": self.stage_sizes,
            "delays_given": self.delays_given,
            "accumulate": self.accumulate,
            "layers": [asdict(l) for l in self.layers],
            "stages": [asdict(s) for s in self.stages],
            "totals": self.totals(),
        }


def parse_int_list(text: str, what: str) -> list[int]:
    """"2,1,3" -> [2, 1, 3]; anything else is a one-line `PlanError` naming `what`."""
    items = [t.strip() for t in str(text).split(",")]
    try:
        return [int(t) for t in items]
    except ValueError:
        raise PlanError(f"{what} must be integers separated by commas, got {text!r}") from None


def make_plan(
    source: LayerSource = 4,
    stages: int | Sequence[int] | None = None,
    schedule: str = "layerpipe",
    *,
    costs: Sequence[float] | None = None,
    balance: str = "params",
    delays: Sequence[int] | None = None,
    example_input: Any = None,
    memory: MemoryFormulas | None = None,
    accumulate: int | Callable[[int], int] = 1,
    model_options: Mapping[str, Any] | None = None,
) -> Plan:
    """Plan a pipeline.

    source:   a layer count (anonymous layers), a model name, an `nn.Sequential`, or `LayerInfo`s.
    stages:   layer counts per stage, a stage count K (balanced), or None (one layer per stage).
    schedule: "layerpipe" (delay 2 S) or "pipedream" (delay S).
    costs:    per-layer costs for balancing; overrides `balance`.
    balance:  "params" (trainable parameter count) or "time" (measured forward+backward;
              needs a model, and `example_input` unless `source` is a model name).
    delays:   per-stage delays to use instead of the delay rule (checked by `plan.retiming`,
              not here: a plan with short delays is still a plan, just not a legal one).
    memory:   strategy name -> versions held at delay d, e.g.
              `layerpipe.weights.memory_formulas(["stash", "ema", "latest"])`; None: no
              memory columns.
    accumulate: ticks per weight update (gradient accumulation): the history formulas take
              the delay in updates, ceil(d_k / accumulate); or a rule giving it from the
              plan's largest delay (a training recipe's, `TrainConfig.accumulation`).
    model_options: builder options of a zoo model named by `source` (e.g. n_layer=6 for gpt).
    """
    memory = memory or {}
    if schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if balance not in BALANCE_MODES:
        raise PlanError(f"unknown balance {balance!r}; choose one of: {', '.join(BALANCE_MODES)}")
    model_name = source if isinstance(source, str) else None
    if model_options and not isinstance(source, str):
        raise PlanError("model options need a model of the zoo by name")
    model = load_model(source, model_options) if isinstance(source, str) else source
    layers = describe_layers(model)
    costs, mode, cost_unit = _layer_costs(model, model_name, layers, stages, costs, balance, example_input)
    if len(costs) != len(layers):
        raise PlanError(f"{len(costs)} layer costs given for {len(layers)} layers")
    sizes = resolve_partition(len(layers), stages, costs)
    num_stages = len(sizes)
    rule = stage_delays(num_stages, schedule)
    if delays is None:
        per_stage = rule
    else:
        per_stage = [int(d) for d in delays]
        if len(per_stage) != num_stages:
            raise PlanError(f"{len(per_stage)} delays given but the plan has {num_stages} stages")
        if any(d < 0 for d in per_stage):
            raise PlanError(f"delays must be >= 0, got {','.join(map(str, per_stage))}")
    if callable(accumulate):
        accumulate = accumulate(max(per_stage))
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise PlanError(f"accumulate must be a positive integer, got {accumulate!r}")
    layer_plans, stage_plans = _layer_and_stage_plans(layers, sizes, per_stage, rule, costs, memory, accumulate)
    log.debug("plan: %d layers in stages %s, delays %s (%s)", len(layers), sizes, per_stage, schedule)
    return Plan(
        model=model_name,
        schedule=schedule,
        balance=mode,
        cost_unit=cost_unit,
        layers=layer_plans,
        stages=stage_plans,
        delays_given=delays is not None,
        accumulate=accumulate,
    )


def _layer_costs(model: Any, model_name: str | None, layers: Sequence[LayerInfo], stages: Any,
                 costs: Sequence[float] | None, balance: str, example_input: Any) -> tuple[list[float], str, str]:
    """(per-layer costs, balance mode, cost unit) as `make_plan` documents them."""
    balancing = isinstance(stages, int) and not isinstance(stages, bool)
    if costs is not None:
        mode, cost_unit = "costs", "cost"
        costs = [float(c) for c in costs]
    elif balancing and balance == "time":
        if model_name is not None and example_input is None:
            from layerpipe import models  # lazy: torch

            example_input = models.example_input(model_name, 32)
        if not hasattr(model, "named_children") or example_input is None:
            raise PlanError("--balance time needs a model and an example input to measure")
        mode, cost_unit = "time", "seconds"
        costs = measure_layer_times(model, example_input)
    else:
        # parameter counts also describe stages of a given partition; anonymous layers count 1
        mode = "params" if balancing else ("given" if stages is not None else "one-per-stage")
        cost_unit = "params" if any(l.params for l in layers) else "layers"
        costs = param_costs(layers)
    return list(costs), mode, cost_unit


def _layer_and_stage_plans(layers: Sequence[LayerInfo], sizes: Sequence[int], per_stage: Sequence[int],
                           rule: Sequence[int], costs: Sequence[float],
                           memory: MemoryFormulas, accumulate: int = 1) -> tuple[list[LayerPlan], list[StagePlan]]:
    num_stages = len(sizes)
    s_of = downstream_stages(num_stages)
    per_stage_cost = stage_costs(costs, sizes)

    layer_plans, stage_plans, start = [], [], 0
    for k, n in enumerate(sizes):
        d = per_stage[k]
        versions = delay_in_updates(d, accumulate)
        members = list(range(start, start + n))
        start += n
        for i in members:
            info = layers[i]
            layer_plans.append(
                LayerPlan(
                    index=i,
                    name=info.name,
                    kind=info.kind,
                    params=info.params,
                    param_bytes=info.param_bytes,
                    stage=k,
                    downstream_stages=s_of[k],
                    delay=d,
                    required_delay=rule[k],
                    stash_versions=versions,
                    bytes=history_bytes(info.param_bytes, versions, memory),
                )
            )
        pbytes = sum(layers[i].param_bytes for i in members)
        stage_plans.append(
            StagePlan(
                stage=k,
                layers=members,
                params=sum(layers[i].params for i in members),
                param_bytes=pbytes,
                cost=per_stage_cost[k],
                downstream_stages=s_of[k],
                delay=d,
                required_delay=rule[k],
                stash_versions=versions,
                bytes=history_bytes(pbytes, versions, memory),
            )
        )
    return layer_plans, stage_plans
