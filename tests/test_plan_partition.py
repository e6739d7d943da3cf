"""Partitions: explicit, one per layer, and balanced (checked against brute force)."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpipe.errors import PlanError
from layerpipe.plan import balanced_partition, resolve_partition
from layerpipe.plan.partition import stage_costs


def all_partitions(n: int, k: int):
    """Every way to cut n layers into k non-empty contiguous stages."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def objective(costs, sizes):
    """(bottleneck, sum S*cost, sum S*layers): what balanced_partition promises to minimise."""
    k = len(sizes)
    per = stage_costs(costs, sizes)
    return (
        max(per),
        sum((k - 1 - i) * c for i, c in enumerate(per)),
        sum((k - 1 - i) * n for i, n in enumerate(sizes)),
    )


@settings(max_examples=200)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=8), st.data())
def test_balanced_partition_is_optimal(costs, data):
    k = data.draw(st.integers(1, len(costs)))
    sizes = balanced_partition(costs, k)
    assert len(sizes) == k and sum(sizes) == len(costs) and min(sizes) >= 1
    best = min(all_partitions(len(costs), k), key=lambda p: objective(costs, p))
    assert max(stage_costs(costs, sizes)) == max(stage_costs(costs, best))
    assert objective(costs, sizes) == objective(costs, best)


@given(st.lists(st.floats(0, 1e-3, allow_nan=False), min_size=1, max_size=7), st.data())
def test_balanced_partition_float_costs_reach_the_optimal_bottleneck(costs, data):
    k = data.draw(st.integers(1, len(costs)))
    sizes = balanced_partition(costs, k)
    best = min(max(stage_costs(costs, p)) for p in all_partitions(len(costs), k))
    assert max(stage_costs(costs, sizes)) <= best * (1 + 2e-9)


def test_balanced_prefers_light_early_stages():
    # equal bottleneck either way; early stages keep more weight versions, so they get less
    assert balanced_partition([1] * 6, 4) == [1, 1, 2, 2]


def test_resolve_partition_forms():
    assert resolve_partition(3) == [1, 1, 1]
    assert resolve_partition(6, [1, 2, 3]) == [1, 2, 3]
    assert resolve_partition(4, 2) == [2, 2]


@pytest.mark.parametrize(
    ("layers", "stages", "message"),
    [
        (3, 4, "4 stages but only 3 layers"),
        (4, [2, 0, 2], "stage 1 is empty"),
        (4, [1, 2], "the stages hold 3 layers"),
        (4, [], "the partition is empty"),
        (4, 0, "need at least one stage"),
        (0, None, "no layers"),
    ],
)
def test_resolve_partition_errors(layers, stages, message):
    with pytest.raises(PlanError, match=message):
        resolve_partition(layers, stages)
