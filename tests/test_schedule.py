"""The tick schedule: actions that print and parse back, and the builder of method.md sec 3."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerpipe.errors import PlanError
from layerpipe.plan import stage_delays
from layerpipe.schedule import Action, build_schedule, format_grid, save_png, stage_rows

actions = st.builds(Action, st.integers(0, 200), st.sampled_from(["F", "B"]), st.integers(0, 10_000))


@given(actions)
def test_action_round_trip(a):
    assert Action.parse(str(a)) == a
    assert str(Action.parse(str(a))) == str(a)


def test_action_text():
    assert str(Action(2, "F", 5)) == "2F5"
    assert Action.parse("2B3") == Action(2, "B", 3)
    assert Action.parse(" 10F0 ") == Action(10, "F", 0)


@pytest.mark.parametrize("text", ["", "2X5", "F5", "2F", "-1F0", "2f5", "2F5x"])
def test_action_parse_rejects(text):
    with pytest.raises(PlanError, match="cannot parse action"):
        Action.parse(text)


def test_action_rejects_bad_fields():
    with pytest.raises(PlanError):
        Action(0, "W", 0)
    with pytest.raises(PlanError):
        Action(-1, "F", 0)


@st.composite
def schedule_inputs(draw):
    k = draw(st.integers(1, 6))
    m = draw(st.integers(1, 10))
    delays = draw(st.one_of(
        st.sampled_from(["layerpipe", "pipedream"]).map(lambda s: stage_delays(k, s)),
        st.lists(st.integers(0, 12), min_size=k, max_size=k),
    ))
    return k, m, delays


@given(schedule_inputs())
def test_builder_follows_method_exactly(inputs):
    k, m, delays = inputs
    ticks = build_schedule(k, m, delays)
    assert list(ticks) == list(range(len(ticks)))  # every tick, from 0, in order
    when = {a: t for t, acts in ticks.items() for a in acts}
    assert len(when) == sum(len(acts) for acts in ticks.values()) == 2 * k * m  # each action once
    for mb in range(m):
        for s in range(k):
            assert when[Action(s, "F", mb)] == mb + s
            assert when[Action(s, "B", mb)] == mb + s + delays[s]
    # draining stops with the last backward
    assert any(a.kind == "B" for a in ticks[len(ticks) - 1])


@given(schedule_inputs())
def test_one_forward_and_one_backward_per_stage_per_tick(inputs):
    k, m, delays = inputs
    for acts in build_schedule(k, m, delays).values():
        counts = Counter((a.stage, a.kind) for a in acts)
        assert max(counts.values(), default=0) <= 1
        # listed by stage, forward before backward: the order a stage runs them in
        assert acts == sorted(acts, key=lambda a: (a.stage, a.kind != "F"))


@given(st.integers(1, 6), st.integers(1, 10), st.sampled_from(["layerpipe", "pipedream"]))
def test_planned_schedules_respect_dependencies(k, m, schedule):
    ticks = build_schedule(k, m, schedule)
    when = {a: t for t, acts in ticks.items() for a in acts}
    hop = 1 if schedule == "layerpipe" else 0  # a backward register per boundary, or none
    for mb in range(m):
        for s in range(k):
            assert when[Action(s, "B", mb)] >= when[Action(s, "F", mb)]
            if s > 0:
                assert when[Action(s, "F", mb)] == when[Action(s - 1, "F", mb)] + 1
            if s < k - 1:
                assert when[Action(s, "B", mb)] == when[Action(s + 1, "B", mb)] + hop
    # the gradient stage s applies at the end of tick t comes from microbatch t - s - d_s
    d = stage_delays(k, schedule)
    for t, acts in ticks.items():
        for a in acts:
            if a.kind == "B":
                assert a.microbatch == t - a.stage - d[a.stage]


def test_layerpipe_steady_state_keeps_every_stage_busy():
    k, m = 4, 12
    ticks = build_schedule(k, m, "layerpipe")
    for t in range(2 * (k - 1), m):  # after the first backward reaches stage 0, before draining
        assert [(a.stage, a.kind) for a in ticks[t]] == [(s, x) for s in range(k) for x in "FB"]


def test_stage_rows_and_grid():
    ticks = build_schedule(2, 2, "layerpipe")
    rows = stage_rows(ticks, 2)
    assert [[str(a) for a in cell] for cell in rows[1]] == [[], ["1F0", "1B0"], ["1F1", "1B1"], []]
    assert format_grid(ticks, 2).splitlines() == [
        "tick         0      1      2      3",
        "stage 0     F0     F1     B0     B1",
        "stage 1      .  F0 B0  F1 B1      .",
    ]


def test_png(tmp_path):
    path = save_png(build_schedule(3, 4, "layerpipe"), 3, tmp_path / "s.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 1, []), "at least one stage"),
        ((2, 0, [2, 0]), "at least one microbatch"),
        ((2, 1, [2]), "1 delays given for 2 stages"),
        ((2, 1, [2, -1]), "delays must be >= 0"),
        ((2, 1, "gpipe"), "unknown schedule"),
    ],
)
def test_builder_errors(args, message):
    with pytest.raises(PlanError, match=message):
        build_schedule(*args)
