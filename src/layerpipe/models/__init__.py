"""Model zoo: every model is an `nn.Sequential` of blocks, so any partition into stages makes sense.

CONTRACT (being filled in): `MODEL_NAMES`, `build_model(name, **kwargs) -> nn.Sequential`,
`example_input(name, batch_size) -> Tensor`, `default_dataset(name) -> str`.
"""
from __future__ import annotations

import torch
from torch import nn

MODEL_NAMES = ("mlp",)


def build_model(name: str, **kwargs) -> nn.Sequential:
    if name == "mlp":
        return nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    from layerpipe.errors import PlanError

    raise PlanError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def example_input(name: str, batch_size: int = 32) -> torch.Tensor:
    return torch.randn(batch_size, 40)


def default_dataset(name: str) -> str:
    return "mnist1d"
