"""`layerpipe.simulate`: analytic bubbles, steady-state throughput, memory hand counts, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerpipe.cli.main import main
from layerpipe.errors import LayerpipeError
from layerpipe.simulate import AllReduce, StageCosts, simulate
from layerpipe.simulate.engine import Op
from layerpipe.simulate.schedules import gpipe_order, history_copies, one_f_one_b_order

KM = [(2, 1), (2, 4), (3, 5), (4, 8), (8, 4), (8, 16), (16, 32)]


def equal(k: int, **kw) -> StageCosts:
    kw = {"forward": 1.0, "backward": 2.0, **kw}
    return StageCosts.uniform(k, **kw)


@pytest.mark.parametrize("k,m", KM)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_synchronous_bubble_is_analytic(k, m, schedule):
    r = simulate(equal(k), schedule, m)
    assert r.bubble == pytest.approx((k - 1) / (m + k - 1), abs=1e-12)
    # one step takes (M + K - 1)(F + B): M microbatches per step
    assert r.throughput == pytest.approx(m / ((m + k - 1) * 3.0))


@pytest.mark.parametrize("k,m", KM)
def test_zero_bubble_no_worse_than_1f1b(k, m):
    for w in (0.5, 1.0, 1.5):
        costs = equal(k, weight_grad=w, update=0.1, transfer=0.05)
        zb, ofob = simulate(costs, "zb-h1", m), simulate(costs, "1f1b", m)
        assert zb.bubble <= ofob.bubble + 1e-12
        assert zb.throughput >= ofob.throughput - 1e-12
        assert max(zb.in_flight) <= k  # 1F1B's peak activation count


def test_zero_bubble_gains_with_split():
    """With F = B = W (the zero-bubble paper's setting) ZB-H1 cuts 1F1B's bubble clearly."""
    costs = StageCosts.uniform(4, forward=1.0, backward=2.0, weight_grad=1.0)
    assert simulate(costs, "zb-h1", 8).bubble < 0.7 * simulate(costs, "1f1b", 8).bubble


@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
@pytest.mark.parametrize("k", [2, 3, 4, 8, 16])
def test_async_no_bubble_and_rate_of_stage_time(schedule, k):
    r = simulate(equal(k, update=0.25), schedule, 8)
    assert r.bubble == 0.0
    assert r.throughput == pytest.approx(1 / 3.25)


def test_async_throughput_is_one_over_slowest_stage():
    fwd = [1.0, 1.5, 0.5, 1.0]
    costs = StageCosts.make(4, forward=fwd, backward=[2.0, 2.0, 3.0, 1.0], update=0.1)
    r = simulate(costs, "layerpipe", 8)
    assert r.throughput == pytest.approx(1 / max(costs.stage_time(k) for k in range(4)))
    assert r.bubble > 0  # the faster stages wait


def test_layerpipe_hides_transfers_pipedream_does_not():
    """2 S(k) delays leave a tick of slack on every boundary; S(k) puts the transfer on the
    critical loop of 1F1B timing."""
    costs = equal(8, update=0.1, transfer=0.3)
    lp, pd = simulate(costs, "layerpipe", 8), simulate(costs, "pipedream", 8)
    assert lp.throughput == pytest.approx(1 / 3.1)
    assert pd.throughput < lp.throughput


def test_async_epoch_includes_fill_and_drain():
    # no global clock: fill and drain ticks are shorter than full ones, so one epoch of M
    # microbatches takes more than M stage times and at most M + 2 (K-1) of them (lockstep)
    r = simulate(equal(2), "layerpipe", 10)
    assert 10 * 3.0 < 10 / r.epoch_throughput <= (10 + 2) * 3.0
    assert r.epoch_throughput < r.throughput


@pytest.mark.parametrize("k,m", [(2, 4), (4, 8), (4, 2), (8, 16)])
def test_in_flight_hand_counts(k, m):
    c = equal(k)
    assert simulate(c, "gpipe", m).in_flight == [m] * k
    assert simulate(c, "1f1b", m).in_flight == [min(m, k - s) for s in range(k)]
    assert simulate(c, "layerpipe", m).in_flight == [2 * (k - 1 - s) + 1 for s in range(k)]
    assert simulate(c, "pipedream", m).in_flight == [(k - 1 - s) + 1 for s in range(k)]


@pytest.mark.parametrize("schedule", ["layerpipe", "pipedream"])
def test_async_accumulation_amortizes_the_update_and_the_versions(schedule):
    """One update per A microbatches: each costs F + B + W + U / A, and stash keeps ceil(d / A)
    versions (a version is an update); with A = M it beats 1F1B at M by its bubble."""
    c = StageCosts.uniform(4, forward=1.0, backward=2.0, update=0.6, weight_bytes=10.0)
    r = simulate(c, schedule, 8, accumulate=3)
    assert r.bubble == 0.0 and r.accumulate == 3
    assert r.throughput == pytest.approx(1 / (3 + 0.6 / 3))
    d0 = r.delays[0]
    assert r.memory["stash"][0] - r.memory["latest"][0] == -(-d0 // 3) * 10
    ref = simulate(c, "1f1b", 8)  # (F + B) M + U per step of M, stretched by the bubble (K-1)/(M+K-1)
    assert ref.throughput == pytest.approx(8 / (3 * (8 + 3) + 0.6))
    assert simulate(c, schedule, 8, accumulate=8).throughput / ref.throughput == pytest.approx(
        (3 * 11 + 0.6) / 8 / (3 + 0.6 / 8))
    with pytest.raises(LayerpipeError, match="accumulate must be at least 1"):
        simulate(c, schedule, 8, accumulate=0)


def test_memory_formula_hand_count():
    # K = 4, stage 0: weights 10, optimizer 20, activations 3 per microbatch, d_0 = 6
    c = StageCosts.uniform(4, forward=1.0, backward=2.0, weight_bytes=10.0, optimizer_bytes=20.0,
                           activation_bytes=3.0)
    lp = simulate(c, "layerpipe", 8)
    assert lp.delays == [6, 4, 2, 0]
    assert lp.memory["stash"][0] == 10 + 20 + 3 * 7 + 6 * 10
    assert lp.memory["ema"][0] == 10 + 20 + 3 * 7 + 10
    assert lp.memory["latest"][0] == 10 + 20 + 3 * 7
    assert lp.memory["ema"][3] == 10 + 20 + 3 * 1  # d = 0: no buffer
    pd = simulate(c, "pipedream", 8)
    assert pd.memory["stash"][0] == 10 + 20 + 3 * 4 + 3 * 10
    assert simulate(c, "1f1b", 8).memory["sync"] == [30 + 3 * n for n in (4, 3, 2, 1)]
    assert simulate(c, "gpipe", 8).memory["sync"] == [30 + 3 * 8] * 4
    assert [history_copies("stash", d) for d in (0, 3)] == [0, 3]
    assert [history_copies("ema", d) for d in (0, 3)] == [0, 1]


def test_orders_hold_every_op_once():
    for order in (gpipe_order(3, 4, 2), one_f_one_b_order(3, 4, 2)):
        for k, ops in order.items():
            assert len(ops) == len(set(ops)) == 2 * (3 * 4 + 1)
            assert ops[-1] == Op(k, "U", 1)


def test_allreduce_and_split_whole():
    ar = AllReduce(latency=0.5, bandwidth=100.0, factor=1.0)
    c = StageCosts.uniform(2, forward=1.0, backward=2.0, update=0.5, weight_bytes=100.0, allreduce=ar)
    assert c.update_time(0) == pytest.approx(0.5 + 0.5 + 1.0)
    assert simulate(c, "layerpipe", 4).throughput == pytest.approx(1 / 5.0)
    w = StageCosts.split_whole(4, forward=4.0, backward=8.0, weight_bytes=40.0, activation_bytes=8.0, transfer=0.1)
    assert w.forward == (1.0,) * 4 and w.weight_bytes == (10.0,) * 4 and w.transfer == (0.1,) * 3
    assert w.activation_bytes == (2.0,) * 4 and w.backward_input == (1.0,) * 4


def test_bad_costs_raise():
    from layerpipe.errors import LayerpipeError

    with pytest.raises(LayerpipeError):
        StageCosts.make(2, forward=1.0, backward=1.0, weight_grad=2.0)
    with pytest.raises(LayerpipeError):
        StageCosts.make(3, forward=[1.0, 2.0], backward=1.0)
    with pytest.raises(LayerpipeError):
        simulate(equal(2), "nope", 4)


def test_no_torch_at_import():
    code = "import sys, layerpipe.simulate, layerpipe.simulate.report, layerpipe.cli.simulate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_table_and_json(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    code = main(["simulate", "--stages", "2,4", "--microbatches", "8", "--forward", "1", "--backward", "2",
                 "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "1f1b" in out and "zb-h1" in out and "layerpipe (ema)" in out
    doc = json.loads(out_json.read_text())
    assert doc["simulated"] is True and len(doc["results"]) == 10
    r = next(r for r in doc["results"] if r["schedule"] == "1f1b" and r["stages"] == 4)
    assert r["bubble"] == pytest.approx(3 / 11)
    # the --json output is a valid --times file
    code = main(["simulate", "--stages", "4", "--times", str(out_json), "--schedules", "1f1b", "--json", "-"])
    again = json.loads(capsys.readouterr().out)
    assert again["results"][0]["bubble"] == pytest.approx(3 / 11)


def test_cli_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    assert main(["simulate", "--stages", "2,4", "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,needle", [
    (["--stages", "0"], "--stages"),
    (["--stages", "65"], "--stages"),
    (["--microbatches", "x"], "--microbatches"),
    (["--forward", "-1"], "--forward"),
    (["--schedules", "gpipe,foo"], "unknown schedule"),
    (["--stages", "4", "--forward", "1,2"], "2 values given for 4 stages"),
    (["--weight-grad", "5"], "exceeds"),
    (["--weight-bytes", "3 apples"], "size"),
    (["--replicas", "2"], "--allreduce-bandwidth"),
    (["--samples-factor", "0"], "--samples-factor"),
    (["--accumulate", "0"], "--accumulate must be at least 1"),
    (["--times", "/nonexistent/t.json"], "cannot read"),
    (["--profile", "mlp", "--forward", "1"], "--profile measures"),
    (["--png", "/nonexistent/dir/x.png"], "no such directory"),
])
def test_cli_errors_one_line(capsys, argv, needle):
    code = main(["simulate", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_cli_usage_error_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--no-such-flag"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_time_to_quality_divides_throughput_by_the_measured_factor():
    """benchmarks/time_to_quality.py: time vs 1F1B = factor x 1F1B's throughput / this one; a
    deeper K without its own factor takes the deepest measured one below it (a lower bound)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_quality.py"
    spec = importlib.util.spec_from_file_location("time_to_quality", path)
    ttq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ttq)
    factors = {("gpt", "pipedream", 4): (1.5, False), ("gpt", "pipedream", 8): (2.0, True)}
    assert ttq.factor_for(factors, "gpt", "pipedream", 4) == (1.5, "measured")
    assert ttq.factor_for(factors, "gpt", "pipedream", 8) == (2.0, "measured, at least")
    assert ttq.factor_for(factors, "gpt", "pipedream", 16) == (2.0, "from K=8, at least")
    assert ttq.factor_for(factors, "gpt", "pipedream", 2) == (None, "not measured")
    assert ttq.factor_for(factors, "gpt", "layerpipe", 8) == (None, "not measured")
    costs = ttq.split_evenly(ttq.PRESETS["gpt"], 4)
    assert sum(costs.forward) == pytest.approx(ttq.PRESETS["gpt"]["forward"])
    assert ttq.parse_factor("gpt:pipedream:8=1.79+") == ("gpt", "pipedream", 8, 1.79, True)
    with pytest.raises(SystemExit, match="MODEL:SCHEDULE:K=X"):
        ttq.parse_factor("gpt:pipedream=2")
    with pytest.raises(SystemExit, match="X >= 1"):
        ttq.parse_factor("gpt:pipedream:4=0.5")
