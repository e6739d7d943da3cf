"""Partition an ordered list of layers into contiguous pipeline stages.

    >>> resolve_partition(6, [1, 2, 3])      # explicit layer counts per stage
    [1, 2, 3]
    >>> resolve_partition(6, 4)              # 4 stages balanced (unit costs)
    [1, 1, 2, 2]
    >>> resolve_partition(3)                 # default: one layer per stage
    [1, 1, 1]

Balancing minimises the largest stage cost (the clock period of the pipeline). Among the
partitions that reach that optimum it then prefers the one that puts the least cost, and
then the fewest layers, on early stages: stage k keeps d_k ~ S(k) stashed weight versions
and activations of 2 S(k) microbatches in flight, so cost placed early is paid many times.
"""
from __future__ import annotations

from collections.abc import Sequence

from layerpipe.errors import PlanError

# relative slack when comparing float stage costs with the optimal bottleneck: measured
# times are floats, and summing them in a different order must not lose the optimum
_REL_TOL = 1e-9


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
    if isinstance(stages, bool):  # bool is an int subclass: refuse `stages=True`
        raise PlanError(f"stages must be a count or a list of layer counts, got {stages!r}")
    if isinstance(stages, int):
        if costs is not None and len(costs) != num_layers:
            raise PlanError(f"{len(costs)} layer costs given for {num_layers} layers")
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


def stage_costs(costs: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Sum of the layer costs of each stage."""
    out, start = [], 0
    for n in sizes:
        out.append(float(sum(costs[start : start + n])))
        start += n
    return out


def parse_stages(text: str | int | None) -> int | list[int] | None:
    """'4' -> 4 balanced stages, '2,1,3,1' -> layers per stage, 'all' -> one layer per stage."""
    if text is None or isinstance(text, int):
        return text
    text = str(text).strip()
    if text in ("all", "layer", "each"):
        return None
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise PlanError(f"--stages must be integers separated by commas (layers per stage), one integer K, or 'all'; got {text!r}") from None
    if "," not in text:
        if parts[0] < 1:
            raise PlanError(f"--stages must be a positive number of stages, got {text!r}")
        return parts[0]
    return parts


def balanced_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Split layers with the given costs into `num_stages` contiguous stages.

    First objective: the smallest possible largest stage cost (exact, dynamic programme).
    Tie-break among optimal partitions: least sum_k S(k) * cost_k, then least
    sum_k S(k) * layers_k, with S(k) = K - 1 - k (see the module docstring). O(K L^2).
    """
    n = len(costs)
    if num_stages < 1:
        raise PlanError(f"need at least one stage, got {num_stages}")
    if num_stages > n:
        raise PlanError(f"{num_stages} stages but only {n} layers: every stage needs at least one layer")
    if any(c < 0 for c in costs):
        raise PlanError("layer costs must be >= 0")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")

    # pass 1: best[k][i] = minimal bottleneck splitting the first i layers into k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            best[k][i] = min(max(best[k - 1][j], prefix[i] - prefix[j]) for j in range(k - 1, i))
    bound = best[num_stages][n] * (1 + _REL_TOL)

    # pass 2: among partitions whose every stage fits under the optimal bottleneck, minimise
    # the weighted tuple (sum S*cost, sum S*layers); tuples add and compare lexicographically
    score: list[list[tuple[float, int] | None]] = [[None] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    score[0][0] = (0.0, 0)
    for k in range(1, num_stages + 1):
        s = num_stages - k  # stages downstream of stage k-1 (0-based)
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                prev = score[k - 1][j]
                cost = prefix[i] - prefix[j]
                if prev is None or cost > bound:
                    continue
                cand = (prev[0] + s * cost, prev[1] + s * (i - j))
                cur = score[k][i]
                if cur is None or cand < cur:
                    score[k][i], cut[k][i] = cand, j
    sizes, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]
