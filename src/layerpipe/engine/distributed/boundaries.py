"""The values crossing each stage boundary of the distributed runtime, and their shapes.

For an `nn.Sequential` cut into slices, one tensor per boundary (`boundary_specs` probes
its per-sample shape and dtype); for a model cut by `layerpipe.split`, the values the
split found (`checked_split`). Each becomes one message per microbatch; a value carries a
gradient back when it is floating point and the graph needs one (`needs_grad`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from layerpipe.errors import PlanError
from layerpipe.split.model import ValueSpec

if TYPE_CHECKING:
    from layerpipe.split import SplitModel


@torch.no_grad()
def boundary_specs(model: nn.Sequential, sizes: Sequence[int], sample: Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Per-sample shape and dtype at every stage boundary: entry k is stage k's input, entry
    K the model's output. One forward of `sample` (two samples or more) in eval mode, so no
    running statistics change."""
    if sample.dim() == 0 or sample.shape[0] < 2:
        raise PlanError("the shape probe needs a sample batch of at least two inputs")
    batch = sample.shape[0]
    was_training = model.training
    model.eval()
    try:
        h = sample
        specs = [(tuple(h.shape[1:]), h.dtype)]
        start = 0
        for k, n in enumerate(sizes):
            h = model[start : start + n](h)
            start += n
            if not isinstance(h, Tensor) or h.dim() == 0 or h.shape[0] != batch:
                raise PlanError(
                    f"stage {k} must return one tensor with the batch as its first dimension "
                    f"(got {type(h).__name__} {tuple(getattr(h, 'shape', ()))} for a batch of {batch})"
                )
            specs.append((tuple(h.shape[1:]), h.dtype))
    finally:
        model.train(was_training)
    return specs


def needs_grad(s: ValueSpec) -> bool:
    return s.requires_grad and (s.dtype.is_floating_point or s.dtype.is_complex)


def message_shape(s: ValueSpec, batch: int) -> tuple[int, ...]:
    return (batch, *s.per_sample_shape) if s.batched else s.shape


def checked_split(split: SplitModel, num_stages: int) -> list[list[ValueSpec]]:
    """The boundary specs of a split model, after the checks that need them."""
    if split.num_stages != num_stages:
        raise PlanError(f"the model is split into {split.num_stages} stages but the run has {num_stages} processes; "
                        "they must be equal (one stage per process)")
    if split.boundary_specs is None:
        raise PlanError("the split model has no boundary shapes: split it with example inputs")
    return split.boundary_specs


def sequential_boundaries(model: nn.Sequential, sizes: Sequence[int], sample: Tensor) -> list[list[ValueSpec]]:
    """One value per boundary of an nn.Sequential cut into slices of `sizes` layers."""
    return [[ValueSpec("x", (1, *shape), dtype, dtype.is_floating_point, True)]
            for shape, dtype in boundary_specs(model, sizes, sample)[1:-1]]
