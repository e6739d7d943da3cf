"""Plan a pipeline: partition layers into stages, derive per-stage delays, check legality.

    from layerpipe.plan import make_plan, verify_delays
    plan = make_plan(4, stages=None, schedule="layerpipe")      # or a model name, an nn.Sequential
    plan.stage_delays                                             # [6, 4, 2, 0]
    verify_delays(plan.stage_sizes, [6, 4, 1, 0]).message()       # 'layer 3 (stage 2) needs 2 delays, has 1'

Modules, in the order data flows: `layers` (what a layer is), `costs` (what balancing
equalises), `partition` (layers -> stages), `delays` (the delay rule), `planner` (the `Plan`),
`graph` (the training data-flow graph), `retiming` (delays -> stage registers, legality),
`spec` (the validated `PipelineSpec` the engines run).
Pure Python: torch is imported only to read a model or time its layers.
"""
from layerpipe.plan.delays import SCHEDULES, delay_in_updates, downstream_stages, layer_delays, stage_delays
from layerpipe.plan.layers import LayerInfo, describe_layers
from layerpipe.plan.partition import balanced_partition, parse_stages, resolve_partition
from layerpipe.plan.planner import LayerPlan, Plan, StagePlan, history_bytes, make_plan
from layerpipe.plan.retiming import RetimingReport, ShortLoop, verify_delays
from layerpipe.plan.spec import ENGINE_SCHEDULES, PipelineSpec, check_delays, make_spec, sequential_spec, split_spec

__all__ = [
    "ENGINE_SCHEDULES",
    "SCHEDULES",
    "PipelineSpec",
    "check_delays",
    "make_spec",
    "sequential_spec",
    "split_spec",
    "LayerInfo",
    "LayerPlan",
    "Plan",
    "RetimingReport",
    "ShortLoop",
    "StagePlan",
    "balanced_partition",
    "parse_stages",
    "describe_layers",
    "delay_in_updates",
    "downstream_stages",
    "history_bytes",
    "layer_delays",
    "make_plan",
    "resolve_partition",
    "stage_delays",
    "verify_delays",
]
