"""Weight strategies: which weights a delayed backward pass uses, and what that costs.

`stash` is exact; `ema` is the LayerPipe2 reconstruction; `latest` is the no-correction
baseline; `weight-ema`, `extrapolate` and `momentum` are other estimators kept for
comparison; `probe` trains like `stash` and measures every estimator against it.

    strategy = make_strategy("ema", stage_params, delay=4, optimizer=opt, alpha=0.3)

Adding a strategy: one file under `weights/` with a `WeightStrategy` subclass decorated with
`@register_strategy` (see `registry.py`); every module of this package is imported here, so
the engines, the CLI and the contract tests (tests/test_weights_contract.py) pick it up.
"""
from __future__ import annotations

import importlib
import pkgutil

# the main strategies first: the registry keeps this order for help texts and tables
from layerpipe.weights import stash as _stash  # noqa: F401
from layerpipe.weights import ema as _ema  # noqa: F401
from layerpipe.weights import simple as _simple  # noqa: F401
from layerpipe.weights import estimators as _estimators  # noqa: F401
from layerpipe.weights import probe as _probe  # noqa: F401
from layerpipe.weights.base import WeightStrategy
from layerpipe.weights.flat import BufferViews, FlatBuffer
from layerpipe.weights.registry import (
    make_strategy,
    memory_formulas,
    register_strategy,
    strategy_class,
    strategy_help,
    strategy_names,
)

for _module in pkgutil.iter_modules(__path__):  # any other strategy file in this package
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BufferViews",
    "FlatBuffer",
    "WeightStrategy",
    "make_strategy",
    "memory_formulas",
    "register_strategy",
    "strategy_class",
    "strategy_help",
    "strategy_names",
]
