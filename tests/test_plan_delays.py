"""The delay rule: method.md's worked examples and properties over random partitions."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerpipe.errors import PlanError
from layerpipe.plan import layer_delays, make_plan, stage_delays

partitions = st.lists(st.integers(1, 4), min_size=1, max_size=8)
schedules = st.sampled_from(["layerpipe", "pipedream"])


# method.md sec 2, the table of worked examples (layers numbered from 1 there)
@pytest.mark.parametrize(
    ("layers", "stages", "s", "delay"),
    [
        (4, None, [3, 2, 1, 0], [6, 4, 2, 0]),
        (4, [2, 2], [1, 1, 0, 0], [2, 2, 0, 0]),
        (6, [1, 2, 3], [2, 1, 1, 0, 0, 0], [4, 2, 2, 0, 0, 0]),
    ],
)
def test_worked_examples(layers, stages, s, delay):
    plan = make_plan(layers, stages, "layerpipe")
    assert [l.downstream_stages for l in plan.layers] == s
    assert [l.delay for l in plan.layers] == delay
    # PipeDream's 1F1B timing: S(l) instead of 2 S(l)
    assert [l.delay for l in make_plan(layers, stages, "pipedream").layers] == s


@given(partitions, schedules)
def test_delays_never_increase_with_depth(sizes, schedule):
    d = layer_delays(sizes, schedule)
    assert all(a >= b for a, b in zip(d, d[1:]))


@given(partitions, schedules)
def test_last_stage_has_no_delay(sizes, schedule):
    plan = make_plan(sum(sizes), sizes, schedule)
    assert plan.stages[-1].delay == 0
    assert all(l.delay == 0 for l in plan.layers if l.stage == len(sizes) - 1)


@given(partitions, schedules)
def test_layers_of_a_stage_share_one_delay(sizes, schedule):
    plan = make_plan(sum(sizes), sizes, schedule)
    for stage in plan.stages:
        assert {plan.layers[i].delay for i in stage.layers} == {stage.delay}
        assert {plan.layers[i].stage for i in stage.layers} == {stage.stage}


@given(partitions)
def test_layerpipe_is_twice_pipedream(sizes):
    assert layer_delays(sizes, "layerpipe") == [2 * d for d in layer_delays(sizes, "pipedream")]


def test_unknown_schedule():
    with pytest.raises(PlanError, match="unknown schedule 'gpipe'"):
        stage_delays(3, "gpipe")
