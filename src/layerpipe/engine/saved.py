"""Small pieces of a stage's saved-tensor handling: the reference the pack hook keeps for a
saved parameter, the lookup from a data pointer to the parameter it views, the hooks of a
backward on the live weights, the version-counter reset and storage swap of a backward
without hooks, and the gradient parts of tied parameters.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor


class ParamRef(NamedTuple):
    """What the pack hook keeps instead of a saved parameter: which one, which view, and the
    dtype autocast cast it to (None: not cast). A tuple: the hook runs for every saved tensor."""

    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the parameter's own (or its cast copy's)
    dtype: torch.dtype | None = None


def same_tensor(t: Any) -> Any:
    """Pack and unpack hook of a stage whose backward reads the live weights (`latest`) where
    its updates cannot be hidden from autograd (`set_versions` missing, or a compensation
    changes the weights in the forward): a saved parameter already aliases the live weights;
    the hooks only switch off autograd's version check."""
    return t


STRIDED = torch.strided


def _version_setter() -> Callable[[tuple[Tensor, ...], tuple[int, ...]], None] | None:
    """torch's private reset of autograd version counters, taking tuples (tensors, versions),
    or None where it is missing or takes other arguments (older torch): the engine then
    keeps the hooks. Tried once on a scratch tensor, not assumed."""
    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if setter is None:
        return None
    probe = torch.zeros(1)
    try:
        probe.add_(1)
        setter((probe,), (0,))
    except (TypeError, RuntimeError):
        return None
    return setter if probe._version == 0 else None


# resets autograd's version counters (see `_version_setter`)
set_versions = _version_setter()


def _storage_swapper() -> Callable[[Any, Any], None] | None:
    """torch's private swap of two storages' memory (`UntypedStorage._swap_data_ptr_`: every
    tensor viewing either storage, autograd's saved views included, then reads the other's
    data; O(1), no copy), or None where it is missing or does not swap (older torch): the
    engine then keeps the hooks. Tried once on scratch tensors, not assumed."""
    swap = getattr(torch.UntypedStorage, "_swap_data_ptr_", None)
    if swap is None:
        return None
    a, b = torch.zeros(1), torch.ones(1)
    view = a.view(1, 1)
    try:
        swap(a.untyped_storage(), b.untyped_storage())
    except (TypeError, RuntimeError):
        return None
    return swap if (float(view[0, 0]), float(b[0])) == (1.0, 0.0) else None


# swaps two storages' memory (see `_storage_swapper`)
swap_storages = _storage_swapper()


def owns_storage(t: Tensor) -> bool:
    """True when `t` is its storage's only occupant: contiguous from offset 0 and as long as the
    storage, so swapping storages moves exactly `t`'s elements."""
    return (t.layout is STRIDED and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def storage_spans(params: Sequence[Tensor]) -> tuple[list[int], list[int], list[int]]:
    """(starts, ends, indices): the byte range of each parameter's storage, sorted by start.
    The pack hook finds the parameter a saved tensor views with one bisect on its data
    pointer (a storage is one allocation, so a pointer inside it is a view of it); on equal
    starts the last parameter wins, as a dictionary keyed by storage would."""
    spans = sorted((p.untyped_storage().data_ptr(), p.untyped_storage().nbytes(), i) for i, p in enumerate(params))
    return [a for a, _, _ in spans], [a + n for a, n, _ in spans], [i for _, _, i in spans]


class TiedGrads:
    """The parts of a tied parameter's gradient computed by the stages that do not own it,
    kept per (microbatch, parameter) until the owner's backward of that microbatch."""

    def __init__(self) -> None:
        self.parts: dict[tuple[int, int], Tensor] = {}

    def add(self, mb: int, p: Tensor, grad: Tensor) -> None:
        key = (mb, id(p))
        prev = self.parts.get(key)
        self.parts[key] = grad if prev is None else prev + grad

    def pop(self, mb: int, p: Tensor) -> Tensor | None:
        return self.parts.pop((mb, id(p)), None)

    def __len__(self) -> int:
        return len(self.parts)
