"""The registry of weight strategies: a strategy is one class in one file, registered by a decorator.

    @register_strategy
    class Mine(WeightStrategy):
        \"\"\"One line that `layerpipe train --help` shows.\"\"\"
        name = "mine"

Everything that lists strategies (the engines, the CLI's help and choices, the planner's
memory columns, the contract tests) reads this registry, so a new strategy shows up
everywhere without editing another file. `layerpipe.weights` imports every module of its
package on import, so a new file under `weights/` is enough.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from layerpipe.errors import LayerpipeError
from layerpipe.weights.base import WeightStrategy

_REGISTRY: dict[str, type[WeightStrategy]] = {}

S = TypeVar("S", bound=type[WeightStrategy])


def register_strategy(cls: S) -> S:
    """Class decorator: make `cls` available under `cls.name`."""
    name = getattr(cls, "name", None)
    if not name or name == WeightStrategy.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"weight strategy {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def strategy_names() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def strategy_class(name: str) -> type[WeightStrategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LayerpipeError(f"unknown weight strategy {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse, in one line, options that strategy `name`'s constructor does not take (before
    anything is built)."""
    params = inspect.signature(strategy_class(name).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in options if k not in params or k in ("self", "params", "delay", "optimizer")]
    if unknown:
        raise LayerpipeError(f"weight strategy {name!r} does not take option(s) {', '.join(unknown)}")


def make_strategy(
    name: str,
    params: Sequence[Tensor],
    delay: int,
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> WeightStrategy:
    """Build strategy `name` for one stage; `options` go to its constructor (e.g. alpha=0.3
    for `ema`). An option the strategy does not take is a one-line error."""
    cls = strategy_class(name)
    try:
        return cls(params, delay, optimizer, **options)
    except TypeError as exc:
        if options and "unexpected keyword" in str(exc):
            raise LayerpipeError(f"weight strategy {name!r} does not take option(s) {', '.join(options)}") from None
        raise


def memory_formulas(names: Sequence[str] | None = None) -> dict[str, Callable[[int], int]]:
    """name -> versions of a stage's weights the strategy holds at delay d (the planner's
    memory columns come from here)."""
    return {n: strategy_class(n).history_versions for n in (names or strategy_names())}


def strategy_help() -> str:
    """One line per strategy from its docstring, for `--help`."""
    lines = []
    for name, cls in _REGISTRY.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        lines.append(f"{name}: {doc[0].rstrip('.') if doc else cls.__name__}")
    return "; ".join(lines)
