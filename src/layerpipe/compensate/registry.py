"""The registry of compensation techniques: `@register` adds one, `make_compensation` builds it.

Two kinds share the registry. A *wrapper* (`Compensation` subclass) wraps an optimizer;
an *optimizer* technique (a function or class registered with `builds_optimizer=True`)
creates the stage's optimizer itself from (params, delay, options).
"""
from __future__ import annotations

import inspect

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from layerpipe.errors import LayerpipeError

from layerpipe.compensate.base import Compensation, OptimizerFactory


@dataclass(frozen=True)
class Technique:
    name: str
    build: Callable[..., Any]
    builds_optimizer: bool
    #: wrappers are applied innermost first by this rank (predict last: it must see the
    #: whole applied update)
    rank: int
    #: the builder takes `max_delay`, the pipeline's largest delay (a rule by depth)
    takes_max_delay: bool = False


TECHNIQUES: dict[str, Technique] = {}


def register(name: str, *, builds_optimizer: bool = False, rank: int = 50) -> Callable[[Any], Any]:
    """Class or function decorator adding a technique under `name`."""

    def deco(obj: Any) -> Any:
        if name in TECHNIQUES:
            raise ValueError(f"compensation {name!r} registered twice")
        takes = "max_delay" in inspect.signature(obj).parameters
        TECHNIQUES[name] = Technique(name, obj, builds_optimizer, rank, takes)
        return obj

    return deco


def technique(name: str) -> Technique:
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise LayerpipeError(f"unknown compensation {name!r}; choose one of: {', '.join(sorted(TECHNIQUES))}") from None


def make_compensation(
    name: str,
    params: Sequence[Tensor],
    delay: int,
    optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
    *,
    max_delay: int | None = None,
    **options: Any,
) -> Any:
    """Build technique `name` for one stage.

    Optimizer techniques ignore `optimizer` and return a new optimizer over `params`;
    wrappers wrap `optimizer` (an instance, or a factory called with `params`). `max_delay`,
    the largest delay of the stage's pipeline, goes to the techniques whose rules need it."""
    tech = technique(name)
    params = list(params)
    if tech.takes_max_delay:
        options["max_delay"] = max_delay
    try:
        if tech.builds_optimizer:
            if optimizer is not None:
                raise LayerpipeError(f"compensation {name!r} is an optimizer; it cannot wrap another one")
            return tech.build(params, delay, **options)
        if optimizer is None:
            raise LayerpipeError(f"compensation {name!r} wraps an optimizer; none was given")
        inner = optimizer if _is_optimizer(optimizer) else optimizer(params)
        return tech.build(params, delay, inner, **options)
    except (TypeError, ValueError) as exc:  # an unknown option, or a value of the wrong type
        raise LayerpipeError(f"compensation {name!r}: {exc}") from None


def _is_optimizer(obj: Any) -> bool:
    return isinstance(obj, (torch.optim.Optimizer, Compensation)) or hasattr(obj, "param_groups")
