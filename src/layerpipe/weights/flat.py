"""Buffers that mirror a list of parameters, for fast whole-stage copies and arithmetic.

One contiguous tensor per (dtype, device) group holds a copy of every parameter; `views` are
shaped like the parameters, so `torch._foreach_*` ops touch all of them in a few kernel
launches instead of one Python iteration per tensor (measured on an H200 for ResNet-18:
1.3 ms per-tensor loop vs 0.035 ms flat). With `separate=True` every view is a tensor of its
own instead (the same foreach launches): a past version the engine may swap into a
parameter's storage for a backward (`layerpipe.engine.saved.swap_storages`) must own its
storage. `state()` and `load_state()` are the one place a strategy's buffers go to and come
back from a checkpoint.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class BufferViews(list):
    """`FlatBuffer.views`: a list that lives as long as its buffer, so the engine may keep
    per-buffer facts on it (`swap_pairs`: the storages it checked once for the swap of a
    backward, valid while `checked_for` is the stage's tuple of live storages)."""

    checked_for: object = None
    swap_pairs: tuple = ()


class FlatBuffer:
    """Storage shaped like `params`: `views[i]` has `params[i]`'s shape, dtype and device."""

    def __init__(self, params: Sequence[Tensor], *, zero: bool = False, separate: bool = False) -> None:
        make = torch.zeros if zero else torch.empty
        if separate:
            self.flats = [make(p.shape, dtype=p.dtype, device=p.device) for p in params]
            self.views = BufferViews(self.flats)
            self.nbytes = sum(f.numel() * f.element_size() for f in self.flats)
            return
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.dtype, p.device), []).append(i)
        self.flats: list[Tensor] = []
        views: list[Tensor | None] = [None] * len(params)
        for (dtype, device), idx in groups.items():
            total = sum(params[i].numel() for i in idx)
            flat = make(total, dtype=dtype, device=device)
            offset = 0
            for i in idx:
                n = params[i].numel()
                views[i] = flat[offset : offset + n].view(params[i].shape)
                offset += n
            self.flats.append(flat)
        self.views: list[Tensor] = BufferViews(v for v in views if v is not None)
        #: bytes actually allocated, counted from the tensors held (fixed: read every tick)
        self.nbytes = sum(f.numel() * f.element_size() for f in self.flats)

    def copy_from(self, tensors: Sequence[Tensor]) -> None:
        if self.views:
            torch._foreach_copy_(self.views, list(tensors))

    def state(self) -> list[Tensor]:
        """Copies of the views, for a checkpoint."""
        return [t.clone() for t in self.views]

    def load_state(self, tensors: Sequence[Tensor]) -> None:
        """The inverse of `state()`; tensors may come from another device."""
        self.copy_from([t.to(v.device) for t, v in zip(tensors, self.views)])
