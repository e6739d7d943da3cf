"""Model zoo: every model is an `nn.Sequential` of blocks, so any split into contiguous
stages is a valid pipeline.

    from layerpipe.models import build_model, example_input, default_dataset
    model = build_model("cnn1d")                    # MNIST-1D defaults: (B, 40) -> (B, 10)
    model = build_model("mlp", input_shape=(64,))   # sklearn digits
    x = example_input("cnn1d", batch_size=32)       # a batch shaped like the dataset's inputs
    default_dataset("resnet18")                     # "cifar100"

| name     | default dataset | input (one sample)   | blocks | parameters (defaults) |
|----------|-----------------|----------------------|--------|-----------------------|
| mlp      | mnist1d         | (40,) float          | 5      | 210,442               |
| cnn1d    | mnist1d         | (40,) or (1, 40)     | 5      | 25,450                |
| resnet18 | cifar100        | (3, 32, 32)          | 10     | 11,220,132            |
| snn      | mnist1d         | (40,) or (1, 40)     | 5      | 25,450                |
| gpt      | text            | (128,) int64 bytes   | 6      | 875,264               |

`num_classes` and `input_shape` default to the default dataset's; other keyword arguments go
to the model's builder (e.g. `hidden=` for mlp, `channels=` for cnn1d/snn, `time_steps=` for
snn, `n_layer=`, `d_model=`, `n_head=`, `block_size=` for gpt). Each block holds parameters,
so a stage is never empty of weights.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerpipe.errors import PlanError

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn1d", "resnet18", "snn", "gpt")


@dataclass(frozen=True)
class _Spec:
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    integer_input: bool = False  # byte ids (gpt) instead of float features


_SPECS: dict[str, _Spec] = {
    "mlp": _Spec("mnist1d", (40,), 10),
    "cnn1d": _Spec("mnist1d", (40,), 10),
    "resnet18": _Spec("cifar100", (3, 32, 32), 100),
    "snn": _Spec("mnist1d", (40,), 10),
    "gpt": _Spec("text", (128,), 256, integer_input=True),
}


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise PlanError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return _SPECS[name]


def _builder(name: str) -> Callable[..., nn.Sequential]:
    # imported on demand: building an MLP need not import the transformer
    if name == "mlp":
        from layerpipe.models.mlp import build_mlp

        return build_mlp
    if name == "cnn1d":
        from layerpipe.models.cnn1d import build_cnn1d

        return build_cnn1d
    if name == "resnet18":
        from layerpipe.models.resnet import build_resnet18

        return build_resnet18
    if name == "snn":
        from layerpipe.models.snn import build_snn

        return build_snn
    from layerpipe.models.gpt import build_gpt

    return build_gpt


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Sequential:
    """Build model `name` as an `nn.Sequential` of blocks (float32, CPU, fresh init).

    `num_classes` / `input_shape` default to the model's default dataset. For gpt,
    `num_classes` is the vocabulary size and `input_shape` is `(seq_len,)`, which sets the
    block size. Raises `PlanError` for an unknown name or a shape the model cannot take.
    """
    spec = _spec(name)
    classes = spec.num_classes if num_classes is None else int(num_classes)
    shape = spec.input_shape if input_shape is None else tuple(int(d) for d in input_shape)
    if classes < 1:
        raise PlanError(f"num_classes must be positive, got {classes}")
    if name == "gpt":
        if len(shape) != 1:
            raise PlanError(f"gpt needs inputs shaped (seq_len,), got {shape}")
        kwargs.setdefault("block_size", shape[0])
        kwargs.setdefault("vocab_size", classes)
    else:
        kwargs.update(num_classes=classes, input_shape=shape)
    builder = _builder(name)
    check_model_options(name, kwargs)
    try:
        return builder(**kwargs)
    except PlanError:
        raise
    except (ValueError, TypeError, RuntimeError, AssertionError, ZeroDivisionError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PlanError(f"model {name!r} cannot be built with these options: {text}") from None


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options the builder of `name` does not take, and values whose type differs
    from the option's default (`norm=maybe` for a bool, `hidden=abc` for a tuple of ints),
    in one line naming the option."""
    _spec(name)
    accepted = inspect.signature(_builder(name)).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        listed = ", ".join(k for k in accepted if k not in ("num_classes", "input_shape"))
        raise PlanError(f"model {name!r} has no option {', '.join(unknown)}; its options: {listed}")
    for key, value in options.items():
        default = accepted[key].default
        if key in ("num_classes", "input_shape") or default is inspect.Parameter.empty:
            continue
        problem = _option_problem(default, value)
        if problem:
            raise PlanError(f"model option {key}={value!r} of {name!r}: {problem} (default {default!r})")


def _option_problem(default: Any, value: Any) -> str | None:
    import math

    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        return None if value >= 1 else "must be at least 1"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a finite number"
        return None if value >= 0 else "must not be negative"
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (tuple, list)) or not value:
            return "must be a non-empty tuple of integers, e.g. " + repr(tuple(default))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            return "every entry must be a positive integer"
    return None


def example_input(name: str, batch_size: int = 32) -> torch.Tensor:
    """A batch shaped like the default dataset's inputs (float32, or int64 bytes for gpt).

    Random but deterministic (its own generator; the global RNG is untouched)."""
    spec = _spec(name)
    gen = torch.Generator().manual_seed(0)
    if spec.integer_input:
        return torch.randint(0, spec.num_classes, (batch_size, *spec.input_shape), generator=gen)
    return torch.randn((batch_size, *spec.input_shape), generator=gen)


def default_dataset(name: str) -> str:
    """The dataset name (see `layerpipe.data.DATASET_NAMES`) whose defaults the model follows."""
    return _spec(name).dataset


__all__ = ["MODEL_NAMES", "build_model", "check_model_options", "default_dataset", "example_input"]
