"""Delay compensation: techniques that make a stage's update robust to its gradient delay.

Each technique lives in its own module and registers itself by name:

- optimizers (create the stage's optimizer): `nesterov` (high, per-delay Nesterov momentum
  AdamW), `muon` (torch.optim.Muon for matrices + AdamW for the rest);
- wrappers (wrap the stage's optimizer; applied innermost first in this order):
  `accumulate` (update every A_k ticks), `pipemare` (annealed per-stage lr with warm-up),
  `error-feedback` (p <- p - u_t - c (u_t - u_{t-1})), `predict` (forward on W + c d_k u_hat;
  shares the `ema` strategy's buffer).

    opt = build_optimizer(params, delay, [("muon", {"lr": 4e-3}), ("error-feedback", {"c": 0.5})])
    pipe = Pipeline(model, stages=4, weights="ema",
                    optimizer=pipeline_optimizer(delays, [("muon", {}), ("predict", {})]))
    attach(pipe)                 # stage hooks (predict); once, after the Pipeline is built
    compensation_bytes(pipe)     # add to the strategies' weight_history_bytes
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.compensate import accumulate, error_feedback, muon, nesterov, pipemare, predict  # noqa: F401  (registers)
from layerpipe.compensate.base import Compensation, OptimizerFactory, history_bytes, steps_now, update_period
from layerpipe.compensate.registry import TECHNIQUES, make_compensation, register, technique
from layerpipe.errors import LayerpipeError

Spec = tuple[str, dict[str, Any]]


def parse_spec(text: str) -> Spec:
    """'error-feedback:c=0.5,per_delay=True' -> ('error-feedback', {'c': 0.5, 'per_delay': True})."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise LayerpipeError(f"compensation option {item!r} is not KEY=VALUE")
        if key.strip() in options:  # the later one would silently win
            raise LayerpipeError(f"compensation {name.strip()!r}: option {key.strip()!r} given twice in {text!r}")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    technique(name.strip())  # fail early on an unknown name
    return name.strip(), options


def _scratch_chain(specs: Iterable[Spec | str], delay: int, max_delay: int) -> Any:
    """The chain `specs` builds for a stage of delay `delay`, on two scratch parameters (a
    matrix and a vector) around plain SGD."""
    scratch = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    return build_optimizer(scratch, delay, list(specs), base=lambda ps: torch.optim.SGD(ps, lr=0.1),
                           max_delay=max_delay)


def check_specs(specs: Iterable[Spec | str]) -> None:
    """Build the chain once on scratch parameters, so that a bad name or option is one line
    before a run starts, not after its first output."""
    _scratch_chain(specs, 1, 1)


def chain_update_period(specs: Sequence[Spec | str], delay: int, max_delay: int) -> int:
    """`update_period` of the chain `specs` builds for a stage of delay `delay`, without that
    stage's parameters (another process's replica of its weight strategy needs it)."""
    return update_period(_scratch_chain(specs, delay, max_delay)) if specs and delay > 0 else 1


def build_optimizer(
    params: Sequence[Tensor],
    delay: int,
    specs: Iterable[Spec | str],
    base: OptimizerFactory | None = None,
    max_delay: int | None = None,
) -> Any:
    """One stage's optimizer: at most one optimizer technique (else `base`), then the wrappers
    in registry rank order (accumulate, pipemare, error-feedback, predict). `max_delay`: the
    pipeline's largest delay, for rules set by depth (`muon:delayed_momentum=depth`)."""
    parsed = [parse_spec(s) if isinstance(s, str) else (s[0], dict(s[1])) for s in specs]
    for name, options in parsed:
        if "max_delay" in options:  # the pipeline gives it; a spec's own would collide
            raise LayerpipeError(f"compensation {name!r}: max_delay is the pipeline's largest delay, not an option")
    optimizers = [s for s in parsed if technique(s[0]).builds_optimizer]
    wrappers = sorted((s for s in parsed if not technique(s[0]).builds_optimizer), key=lambda s: technique(s[0]).rank)
    if len(optimizers) > 1:
        raise LayerpipeError(f"choose one optimizer technique, got {', '.join(s[0] for s in optimizers)}")
    params = list(params)
    if optimizers:
        opt = make_compensation(optimizers[0][0], params, delay, max_delay=max_delay, **optimizers[0][1])
    elif base is not None:
        opt = base(params)
    else:
        raise LayerpipeError("no optimizer: give an optimizer technique (nesterov, muon) or a base factory")
    for name, options in wrappers:
        opt = make_compensation(name, params, delay, opt, max_delay=max_delay, **options)
    return opt


def pipeline_optimizer(
    delays: Sequence[int], specs: Iterable[Spec | str], base: OptimizerFactory | None = None
) -> Callable[[list[Tensor]], Any]:
    """An optimizer factory for `Pipeline(optimizer=...)` that knows each stage's delay.

    The engine calls the factory once per stage with parameters, in stage order; this counts
    the calls. (Stages without parameters do not call it: give `delays` of those with.)"""
    specs = list(specs)
    calls = iter(range(len(delays)))
    max_delay = max(delays, default=0)

    def factory(params: list[Tensor]) -> Any:
        k = next(calls, None)
        if k is None:
            raise LayerpipeError(f"pipeline_optimizer was built for {len(delays)} stages and called once more")
        return build_optimizer(params, delays[k], specs, base, max_delay=max_delay)

    return factory


def attach_stage(stage: Any) -> None:
    """Give a stage's compensation its stage (installs forward prediction hooks)."""
    fn = getattr(stage.optimizer, "attach", None)
    if callable(fn):
        fn(stage)


def attach(pipeline: Any) -> None:
    """`attach_stage` for every stage of a pipeline built with `pipeline_optimizer`."""
    for stage in pipeline.stages:
        attach_stage(stage)


def compensation_bytes(pipeline: Any) -> int:
    """Bytes the stages' compensations hold (beside the weight strategies' history)."""
    return sum(history_bytes(stage.optimizer) for stage in pipeline.stages)


__all__ = [
    "TECHNIQUES",
    "Compensation",
    "attach",
    "attach_stage",
    "build_optimizer",
    "chain_update_period",
    "check_specs",
    "compensation_bytes",
    "history_bytes",
    "steps_now",
    "update_period",
    "make_compensation",
    "parse_spec",
    "pipeline_optimizer",
    "register",
]
