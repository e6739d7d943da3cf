"""A model's inputs held for a whole dataset: a tensor, a tuple of positional arguments or a
dict of keyword arguments, every tensor with the samples along dim 0.

    x = {"input_ids": ids, "attention_mask": mask, "use_cache": False}   # ids: (N, T)
    take(x, idx)        # {"input_ids": ids[idx], "attention_mask": mask[idx], "use_cache": False}
    num_samples(x)      # N
    to_device(x, "cuda")

Values that are not tensors (flags such as `use_cache=False`) are passed as they are. A plain
tensor takes the fast path (`x[idx]`), so the `nn.Sequential` engines see no difference.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from layerpipe.errors import LayerpipeError


def as_call(inputs: Any) -> tuple[tuple, dict]:
    """A model's inputs as (args, kwargs): a tensor, a tuple of positional arguments or a dict
    of keyword arguments."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    raise LayerpipeError(f"the model's inputs must be a tensor, a tuple (positional arguments) or a dict (keyword "
                         f"arguments), got {type(inputs).__name__}")


def accuracy_counts(out: Any, y: Any) -> tuple[int, int] | None:
    """(correct, count) of class scores `out` (..., C) against labels `y` (...), or None when
    the output is not such a tensor (a Hugging Face ModelOutput, say)."""
    if not (isinstance(out, Tensor) and isinstance(y, Tensor) and out.dim() == y.dim() + 1
            and out.shape[:-1] == y.shape and not y.is_floating_point()):
        return None
    return int((out.argmax(-1) == y).sum()), y.numel()


def take(x: Any, idx: Any) -> Any:
    """The samples `idx` (an index tensor or a slice) of every tensor in `x`."""
    if isinstance(x, Tensor):
        return x[idx]
    if isinstance(x, tuple):
        return tuple(v[idx] if isinstance(v, Tensor) else v for v in x)
    if isinstance(x, Mapping):
        return {k: v[idx] if isinstance(v, Tensor) else v for k, v in x.items()}
    raise LayerpipeError(f"inputs must be a tensor, a tuple or a dict of tensors, got {type(x).__name__}")


def num_samples(x: Any) -> int:
    """The number of samples (dim 0 of every tensor; they must agree)."""
    if isinstance(x, Tensor):
        return len(x)
    values = list(x.values()) if isinstance(x, Mapping) else list(x) if isinstance(x, tuple) else None
    if values is None:
        raise LayerpipeError(f"inputs must be a tensor, a tuple or a dict of tensors, got {type(x).__name__}")
    sizes = {int(v.shape[0]) for v in values if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise LayerpipeError(f"every input tensor must hold the samples along dim 0 with one count; got sizes {sorted(sizes)}")
    return sizes.pop()


def to_device(x: Any, device: torch.device | str) -> Any:
    """`x` with every tensor on `device`."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(v.to(device) if isinstance(v, Tensor) else v for v in x)
    if isinstance(x, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in x.items()}
    return x
