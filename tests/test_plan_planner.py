"""The Plan: per-layer and per-stage delays, stash versions and weight-history bytes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerpipe.errors import PlanError
from layerpipe.plan import LayerInfo, describe_layers, history_bytes
from layerpipe.plan import make_plan as _make_plan
from layerpipe.weights import memory_formulas

MEMORY = memory_formulas(["stash", "ema", "latest"])


def make_plan(*args, **kwargs):
    return _make_plan(*args, memory=MEMORY, **kwargs)


def test_history_bytes_rule():
    assert history_bytes(100, 6, MEMORY) == {"stash": 600, "ema": 100, "latest": 0}
    assert history_bytes(100, 0, MEMORY) == {"stash": 0, "ema": 0, "latest": 0}


def test_bytes_from_layer_infos():
    layers = [LayerInfo(str(i), "Linear", params=10 * (i + 1), param_bytes=40 * (i + 1)) for i in range(4)]
    plan = make_plan(layers, [1, 2, 1], "layerpipe")
    assert [l.delay for l in plan.layers] == [4, 2, 2, 0]
    assert [l.stash_versions for l in plan.layers] == [4, 2, 2, 0]
    assert [l.bytes["stash"] for l in plan.layers] == [4 * 40, 2 * 80, 2 * 120, 0]
    assert [l.bytes["ema"] for l in plan.layers] == [40, 80, 120, 0]
    assert [s.bytes for s in plan.stages] == [
        {"stash": 160, "ema": 40, "latest": 0},
        {"stash": 400, "ema": 200, "latest": 0},
        {"stash": 0, "ema": 0, "latest": 0},
    ]
    t = plan.totals()
    assert t["bytes"] == {"stash": 560, "ema": 240, "latest": 0}
    assert t["params"] == 100 and t["param_bytes"] == 400 and t["stash_versions"] == 6
    # equal stages: stash holds sum_k d_k |W_k| = (K-1)|W| with d_k = 2 S(k) (method.md sec 4),
    # half that with pipedream's S(k); ema at most |W| whatever K is
    equal = [LayerInfo(str(i), params=5, param_bytes=20) for i in range(4)]
    assert make_plan(equal, None, "layerpipe").totals()["bytes"]["stash"] == 3 * 80
    assert make_plan(equal, None, "pipedream").totals()["bytes"]["stash"] == 3 * 80 // 2
    assert make_plan(equal, None, "layerpipe").totals()["bytes"]["ema"] == 3 * 20


def test_accumulation_counts_versions_in_updates():
    # one update every 3 ticks: a version is an update, so stash keeps ceil(d / 3) of them
    layers = [LayerInfo(str(i), "Linear", params=10 * (i + 1), param_bytes=40 * (i + 1)) for i in range(4)]
    plan = make_plan(layers, [1, 2, 1], "layerpipe", accumulate=3)
    assert [l.delay for l in plan.layers] == [4, 2, 2, 0]  # delays stay in ticks
    assert [l.stash_versions for l in plan.layers] == [2, 1, 1, 0]
    assert [l.bytes["stash"] for l in plan.layers] == [2 * 40, 1 * 80, 1 * 120, 0]
    assert [l.bytes["ema"] for l in plan.layers] == [40, 80, 120, 0]
    assert plan.totals()["bytes"]["stash"] == 280 and plan.to_dict()["accumulate"] == 3
    # a rule (a recipe's) gets the plan's largest delay and gives the same plan
    seen = []
    ruled = make_plan(layers, [1, 2, 1], "layerpipe", accumulate=lambda d: seen.append(d) or 3)
    assert seen == [4] and ruled == plan
    with pytest.raises(PlanError, match="accumulate must be a positive integer"):
        make_plan(layers, None, accumulate=0)


def test_planned_stash_bytes_are_what_the_engine_holds_under_accumulation():
    torch = pytest.importorskip("torch")
    from layerpipe import Pipeline
    from layerpipe.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp")
    for every in (1, 2, 3):
        pipe = Pipeline(build_model("mlp"), stages=3, weights="stash",
                        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01),
                        compensation=[f"accumulate:every={every}"] if every > 1 else None)
        x, y = torch.randn(4, 40), torch.randint(0, 10, (4,))
        peak = 0
        for _ in range(12):
            pipe.step(x, y)
            peak = max(peak, pipe.weight_history_bytes())
        plan = make_plan(model, pipe.stage_sizes, "layerpipe", accumulate=every)
        assert plan.stage_delays == pipe.delays
        assert peak == plan.totals()["bytes"]["stash"], every


def test_model_bytes_match_torch():
    torch = pytest.importorskip("torch")
    from layerpipe.models import build_model

    model = build_model("mlp")
    plan = make_plan(model, None, "layerpipe")
    for layer, child in zip(plan.layers, model.children()):
        expected = sum(p.numel() * p.element_size() for p in child.parameters())
        assert layer.param_bytes == expected
        assert layer.bytes["stash"] == layer.delay * expected
    assert plan.totals()["params"] == sum(p.numel() for p in model.parameters())
    assert isinstance(model, torch.nn.Module)


def test_layer_kinds():
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Conv1d(1, 1, 1), nn.ReLU()), nn.Sequential())
    assert [l.kind for l in describe_layers(model)] == ["Linear", "Conv1d+ReLU", "Sequential"]
    assert [l.name for l in describe_layers(model)] == ["0", "1", "2"]


def test_model_by_name_and_balanced_by_params():
    plan = make_plan("mlp", 2)
    assert plan.model == "mlp" and plan.num_stages == 2 and plan.balance == "params"
    assert plan.stage_delays == [2, 0]
    costs = [float(l.params) for l in describe_layers("mlp")]
    best = min(max(sum(costs[:i]), sum(costs[i:])) for i in range(1, len(costs)))
    assert plan.totals()["bottleneck_cost"] == best


def test_balance_by_time():
    plan = make_plan("mlp", 2, balance="time")
    assert plan.balance == "time" and plan.cost_unit == "seconds"
    assert plan.num_stages == 2 and all(s.cost > 0 for s in plan.stages)


def test_given_costs_and_delays():
    plan = make_plan(4, 2, costs=[1, 1, 1, 5], delays=[3, 0])
    assert plan.stage_sizes == [3, 1] and plan.balance == "costs"
    assert plan.stage_delays == [3, 0] and [s.required_delay for s in plan.stages] == [2, 0]
    assert plan.delays_given and plan.layers[0].stash_versions == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": 4, "delays": [1, 0]}, "2 delays given but the plan has 4 stages"),
        ({"source": 4, "delays": [6, 4, 2, -1]}, "delays must be >= 0"),
        ({"source": 4, "stages": 2, "balance": "time"}, "needs a model"),
        ({"source": 4, "stages": 2, "balance": "flops"}, "unknown balance"),
        ({"source": 4, "schedule": "gpipe"}, "unknown schedule"),
        ({"source": "nope"}, "unknown model 'nope'"),
        ({"source": 0}, "positive integer"),
        ({"source": 3, "stages": 4}, "4 stages but only 3 layers"),
        ({"source": 4, "model_options": {"n_layer": 2}}, "model options need a model of the zoo by name"),
    ],
)
def test_plan_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        make_plan(**kwargs)


def test_to_dict_is_json():
    doc = json.loads(json.dumps(make_plan(6, [1, 2, 3], "pipedream").to_dict()))
    assert doc["num_stages"] == 3 and doc["schedule"] == "pipedream"
    assert [l["stage"] for l in doc["layers"]] == [0, 1, 1, 2, 2, 2]
    assert [l["downstream_stages"] for l in doc["layers"]] == [2, 1, 1, 0, 0, 0]
    assert [l["delay"] for l in doc["layers"]] == [2, 1, 1, 0, 0, 0]


def test_planning_layer_counts_does_not_import_torch():
    code = (
        "import sys; from layerpipe.plan import make_plan, verify_delays; from layerpipe.schedule import build_schedule;"
        "p = make_plan(6, 3); verify_delays(p.stage_sizes, p.stage_delays); build_schedule(3, 4, p.stage_delays);"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
