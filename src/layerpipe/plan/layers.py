"""What the planner knows about a layer: a name, a kind, and its trainable parameters.

    >>> [l.name for l in describe_layers(3)]           # three anonymous layers
    ['0', '1', '2']
    >>> describe_layers("mlp")[0]                       # doctest: +SKIP
    LayerInfo(name='0', kind='Linear', params=5248, param_bytes=20992)

The planner itself never touches torch: a model (an `nn.Sequential`, or a name from
`layerpipe.models.MODEL_NAMES`) is turned into plain `LayerInfo` records here, and torch is
imported only when a model is actually given.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from layerpipe.errors import PlanError


@dataclass(frozen=True)
class LayerInfo:
    """One entry of the ordered layer list."""

    name: str
    """The child's name in the `nn.Sequential` ("0", "1", ...), or its index when anonymous."""
    kind: str = "layer"
    """The module's class name ("Linear", "Conv1d", ...); "layer" for anonymous layers."""
    params: int = 0
    """Number of trainable parameters (elements)."""
    param_bytes: int = 0
    """Bytes of trainable parameters: what one stored weight version of the layer costs."""


LayerSource = int | str | Sequence[LayerInfo] | Any
"""A layer count, a model name, a sequence of `LayerInfo`, or an `nn.Sequential`-like module."""


def anonymous_layers(count: int) -> list[LayerInfo]:
    """`count` layers with no known parameters (for `--layers N`)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PlanError(f"the number of layers must be a positive integer, got {count!r}")
    return [LayerInfo(name=str(i)) for i in range(count)]


def _kind(module: Any) -> str:
    """The class name; for a plain `nn.Sequential` block, what it chains ("Conv1d+ReLU")."""
    kind = type(module).__name__
    inner = [type(c).__name__ for c in module.children()]
    if kind == "Sequential" and inner:
        return "+".join(inner[:3]) + ("+..." if len(inner) > 3 else "")
    return kind


def module_layers(model: Any) -> list[LayerInfo]:
    """The direct children of an `nn.Sequential` (or any module with `named_children`)."""
    layers = []
    for name, child in model.named_children():
        trainable = [p for p in child.parameters() if p.requires_grad]
        layers.append(
            LayerInfo(
                name=name,
                kind=_kind(child),
                params=sum(int(p.numel()) for p in trainable),
                param_bytes=sum(int(p.numel()) * int(p.element_size()) for p in trainable),
            )
        )
    if not layers:
        raise PlanError(f"the model {type(model).__name__} has no child layers to place in stages")
    return layers


def load_model(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Build a model of the zoo by name, with its builder's `options` (`n_layer=6`); unknown
    names and options are a `PlanError` (torch is imported here)."""
    from layerpipe import models  # lazy: importing the zoo imports torch

    if name not in models.MODEL_NAMES:
        raise PlanError(f"unknown model {name!r}; choose one of: {', '.join(models.MODEL_NAMES)}")
    return models.build_model(name, **dict(options or {}))


def describe_layers(source: LayerSource) -> list[LayerInfo]:
    """Turn any accepted layer source into the ordered list of `LayerInfo`."""
    if isinstance(source, bool):
        raise PlanError(f"cannot plan layers from {source!r}")
    if isinstance(source, int):
        return anonymous_layers(source)
    if isinstance(source, str):
        return module_layers(load_model(source))
    if hasattr(source, "named_children"):
        return module_layers(source)
    if isinstance(source, Sequence) and all(isinstance(x, LayerInfo) for x in source):
        if not source:
            raise PlanError("the model has no layers")
        return list(source)
    raise PlanError(f"cannot plan layers from a {type(source).__name__}")
