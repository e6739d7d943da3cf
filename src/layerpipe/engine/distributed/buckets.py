"""Data parallelism: a stage's weight gradients summed over its replicas, one flat bucket per dtype.

    started = start_gradient_reduce(comm, stage.params, n_j / N)   # right after the backward
    ...                                                            # send the input gradient back
    finish_gradient_reduce(comm, started)                          # just before the update

Each replica weights its gradients by its share n_j / N of the global microbatch (so that the
sum is the gradient of the global mean loss even for the last, smaller microbatch), copies
them into one flat bucket per dtype and starts its `all_reduce` (sum over the stage's "dp"
group, `Comm.all_reduce_async`) at once; the sums are copied back into `param.grad` when
awaited. Parameters without a gradient (not reached) are left out; every replica has the
same graph, so the same ones.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from layerpipe.engine.distributed.transport import Comm

#: per dtype: the parameters in the bucket, and the all-reduce's handle
Started = list[tuple[list[Tensor], Any]]


def start_gradient_reduce(comm: Comm, params: Sequence[Tensor], weight: float) -> Started:
    """Weight the gradients of `params` by `weight`, flatten them into one bucket per dtype
    and start summing the buckets over the stage's replicas."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    started = []
    for group in by_dtype.values():
        bucket = torch.cat([p.grad.reshape(-1) for p in group]).mul_(weight)
        started.append((group, comm.all_reduce_async(bucket)))
    return started


def finish_gradient_reduce(comm: Comm, started: Started) -> None:
    """Wait for the sums and copy them back into the parameters' gradients."""
    for group, handle in started:
        bucket = comm.wait_all_reduce(handle)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(bucket[offset : offset + n].view_as(p.grad))
            offset += n
