"""The retimed training graph: method.md's registers, legality, loops, delay-free paths."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerpipe.errors import PlanError
from layerpipe.plan import layer_delays, stage_delays, verify_delays
from layerpipe.plan.graph import node_names, training_graph
from layerpipe.plan.retiming import layer_loops, retime, stage_retiming
from layerpipe.schedule import build_schedule

partitions = st.lists(st.integers(1, 3), min_size=1, max_size=6)
schedules = st.sampled_from(["layerpipe", "pipedream"])


def stage_of(sizes):
    return [k for k, n in enumerate(sizes) for _ in range(n)]


def test_worked_example_4_layers_4_stages():
    """method.md sec 2: one register on each forward and backward edge, three on the label."""
    report = verify_delays([1, 1, 1, 1], [6, 4, 2, 0], "layerpipe")
    g = report.retimed
    assert report.legal
    assert [g.edge(f"F{i}", f"F{i + 1}").delay for i in (1, 2, 3)] == [1, 1, 1]
    assert [g.edge(f"B{i + 1}", f"B{i}").delay for i in (3, 2, 1)] == [1, 1, 1]
    assert g.edge("Y", "loss").delay == 3
    assert report.registers() == {"forward": [1, 1, 1], "backward": [1, 1, 1], "label": 3}
    # the delays left the gradient edges entirely; the weight register stays
    assert all(g.edge(f"B{i}", f"U{i}").delay == 0 for i in (1, 2, 3, 4))
    assert all(g.edge(f"U{i}", f"W{i}").delay == 1 for i in (1, 2, 3, 4))
    # loop l through the loss holds 2 S(l) stage registers plus its weight register
    for l, s in enumerate([3, 2, 1, 0]):
        main = max(layer_loops(g, l), key=len)
        assert "loss" in [e.dst for e in main]
        assert sum(e.delay for e in main) == 2 * s + 1
        assert sum(e.delay for e in main if e.kind in ("activation", "grad_input")) == 2 * s


def test_worked_example_two_stages_and_pipedream():
    report = verify_delays([2, 2], [2, 0], "layerpipe")
    assert report.legal and report.registers() == {"forward": [1], "backward": [1], "label": 1}
    report = verify_delays([1, 2, 3], [2, 1, 0], "pipedream")
    # 1F1B passes input gradients on within the tick: no backward registers
    assert report.legal and report.registers() == {"forward": [1, 1], "backward": [0, 0], "label": 2}


def test_short_loop_message_exact():
    report = verify_delays([1, 1, 1, 1], [6, 4, 1, 0], "layerpipe")
    assert not report.legal
    assert report.message() == "layer 3 (stage 2) needs 2 delays, has 1"
    assert str(verify_delays([1, 2, 3], [4, 1, 0], "layerpipe").short_loops[0]) == "layer 2 (stage 1) needs 2 delays, has 1"


def brute_force_cycles(graph):
    """Every simple cycle, as a frozenset of (src, dst), by plain DFS from each lowest node."""
    names = list(graph.nodes)
    rank = {n: i for i, n in enumerate(names)}
    found = set()

    def dfs(start, node, path, seen):
        for e in graph.out_edges(node):
            if e.dst == start:
                found.add(frozenset(path + [(e.src, e.dst)]))
            elif rank[e.dst] > rank[start] and e.dst not in seen:
                dfs(start, e.dst, path + [(e.src, e.dst)], seen | {e.dst})

    for s in names:
        dfs(s, s, [], {s})
    return found


@pytest.mark.parametrize("sizes", [[1], [1, 1], [2, 1], [1, 1, 1], [1, 2, 1]])
def test_layer_loops_are_all_the_cycles(sizes):
    g = training_graph(stage_of(sizes), [0] * sum(sizes))
    ours = [frozenset((e.src, e.dst) for e in loop) for l in range(sum(sizes)) for loop in layer_loops(g, l)]
    assert len(ours) == len(set(ours))
    assert set(ours) == brute_force_cycles(g)


@given(partitions, schedules)
def test_retiming_is_the_tick_schedule(sizes, schedule):
    """r(v) is the tick at which v handles microbatch 0, as in method.md sec 3."""
    g = training_graph(stage_of(sizes), layer_delays(sizes, schedule))
    r = stage_retiming(g, schedule)
    d = stage_delays(len(sizes), schedule)
    ticks = build_schedule(len(sizes), 1, d)
    when = {str(a): t for t, acts in ticks.items() for a in acts}
    for l, k in enumerate(stage_of(sizes)):
        _, f, b, _ = node_names(l)
        assert r[f] == when[f"{k}F0"] == k
        assert r[b] == when[f"{k}B0"] == k + d[k]


@given(partitions, schedules)
def test_planned_delays_are_legal(sizes, schedule):
    report = verify_delays(sizes, stage_delays(len(sizes), schedule), schedule)
    assert report.legal, report.message()
    assert all(e.delay >= 0 for e in report.retimed.edges)
    assert report.loops_checked > 0 and not report.loops_changed
    assert report.required == layer_delays(sizes, schedule)
    assert report.surplus == [0] * sum(sizes)
    assert report.max_delay_free_span == (1 if schedule == "layerpipe" else len(sizes))


@given(partitions, schedules, st.data())
def test_one_stage_short_is_illegal(sizes, schedule, data):
    delays = stage_delays(len(sizes), schedule)
    candidates = [k for k, d in enumerate(delays) if d > 0]
    if not candidates:
        return  # a single stage needs no delay: nothing to take away
    k = data.draw(st.sampled_from(candidates))
    short = list(delays)
    short[k] -= 1
    report = verify_delays(sizes, short, schedule)
    assert not report.legal
    first = sum(sizes[:k])  # the first layer of stage k: earlier stages are still fine
    assert report.message() == f"layer {first + 1} (stage {k}) needs {delays[k]} delays, has {delays[k] - 1}"
    assert [s.layer for s in report.short_loops] == list(range(first, first + sizes[k]))


@given(partitions, schedules, st.data())
def test_one_layer_short_is_named(sizes, schedule, data):
    delays = layer_delays(sizes, schedule)
    candidates = [l for l, d in enumerate(delays) if d > 0]
    if not candidates or len(delays) == len(sizes):
        return  # per-layer delays are only told apart from per-stage ones when K < L
    l = data.draw(st.sampled_from(candidates))
    short = list(delays)
    short[l] -= 1
    report = verify_delays(sizes, short, schedule)
    assert report.short_loops[0].layer == l and len(report.short_loops) == 1


@given(partitions, schedules, st.data())
def test_surplus_is_legal_and_stays_on_the_gradient_edge(sizes, schedule, data):
    base = stage_delays(len(sizes), schedule)
    extra = data.draw(st.lists(st.integers(0, 3), min_size=len(sizes), max_size=len(sizes)))
    report = verify_delays(sizes, [d + x for d, x in zip(base, extra)], schedule)
    assert report.legal
    per_layer_extra = [x for x, n in zip(extra, sizes) for _ in range(n)]
    assert report.surplus == per_layer_extra
    for l, x in enumerate(per_layer_extra):
        _, _, b, u = node_names(l)
        assert report.retimed.edge(b, u).delay == x
    assert report.registers()["label"] == len(sizes) - 1


@given(partitions, schedules, st.data())
def test_retiming_keeps_every_loop_delay_count(sizes, schedule, data):
    delays = data.draw(st.lists(st.integers(0, 8), min_size=sum(sizes), max_size=sum(sizes)))
    g = training_graph(stage_of(sizes), delays)
    gr = retime(g, stage_retiming(g, schedule))
    for l in range(sum(sizes)):
        for before, after in zip(layer_loops(g, l), layer_loops(gr, l)):
            assert [(e.src, e.dst) for e in before] == [(e.src, e.dst) for e in after]
            # the weight register, plus D(l) on every loop through the gradient edge
            expected = 1 + delays[l] * any(e.kind == "gradient" for e in before)
            assert sum(e.delay for e in before) == sum(e.delay for e in after) == expected


def test_plain_sgd_cannot_be_pipelined():
    """Without delayed gradients (D = 0) only one stage is legal."""
    assert verify_delays([3], [0], "layerpipe").legal
    assert not verify_delays([1, 1], [0, 0], "layerpipe").legal


@pytest.mark.parametrize(
    ("delays", "message"),
    [([6, 4, 2], "3 delays given but the plan has 4 stages"), ([6, 4, -1, 0], "delays must be >= 0")],
)
def test_bad_delays(delays, message):
    with pytest.raises(PlanError, match=message):
        verify_delays([1, 1, 1, 1], delays)


def test_unknown_schedule():
    with pytest.raises(PlanError, match="unknown schedule"):
        verify_delays([1, 1], [2, 0], "gpipe")
