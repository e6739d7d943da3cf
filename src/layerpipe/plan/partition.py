"""Partition an ordered list of layers into contiguous pipeline stages."""
from __future__ import annotations

from collections.abc import Sequence

from layerpipe.errors import PlanError


def resolve_partition(
    num_layers: int,
    stages: int | Sequence[int] | None = None,
    costs: Sequence[float] | None = None,
) -> list[int]:
    """Return the number of layers in each stage.

    `stages` is a list of layer counts per stage, an int K (K stages balanced by `costs`,
    one per layer, default 1 each), or None (one layer per stage).
    """
    if num_layers < 1:
        raise PlanError("the model has no layers")
    if stages is None:
        return [1] * num_layers
    if isinstance(stages, int):
        return balanced_partition(costs if costs is not None else [1.0] * num_layers, stages)
    sizes = [int(s) for s in stages]
    if not sizes:
        raise PlanError("the partition is empty")
    if any(s < 1 for s in sizes):
        k = next(i for i, s in enumerate(sizes) if s < 1)
        raise PlanError(f"stage {k} is empty: every stage needs at least one layer")
    if sum(sizes) != num_layers:
        raise PlanError(
            f"the stages hold {sum(sizes)} layers ({','.join(map(str, sizes))}) but the model has {num_layers}"
        )
    return sizes


def balanced_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Split layers with the given costs into `num_stages` contiguous stages minimising the
    largest stage cost (the pipeline's clock period); exact dynamic programme, O(K L^2)."""
    n = len(costs)
    if num_stages < 1:
        raise PlanError(f"need at least one stage, got {num_stages}")
    if num_stages > n:
        raise PlanError(f"{num_stages} stages but only {n} layers: every stage needs at least one layer")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal bottleneck splitting the first i layers into k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                # ties: prefer the later cut, so earlier stages are not overloaded
                if cost < best[k][i] or (cost == best[k][i] and j > cut[k][i]):
                    best[k][i], cut[k][i] = cost, j
    sizes, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]
