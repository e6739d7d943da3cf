"""`layerpipe plan`: output, exit codes, one-line errors, golden JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerpipe.cli.main import main

GOLDEN = Path(__file__).parent / "golden"
# LAYERPIPE_UPDATE_GOLDEN=1 rewrites the golden files instead of comparing with them
UPDATE = os.environ.get("LAYERPIPE_UPDATE_GOLDEN") == "1"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_plan(capsys):
    from layerpipe.models import MODEL_NAMES

    code, out, err = run(capsys)
    assert code == 0 and err == ""
    model = "cnn1d" if "cnn1d" in MODEL_NAMES else "mlp"
    assert out.startswith(f"model {model}: ") and " in 4 stages " in out
    assert "retiming: legal" in out
    assert "stage 3" in out and "tick" in out  # the grid


def test_schedule_defaults_to_the_models_training_recipe(capsys):
    from layerpipe.training import TrainConfig

    code, out, _ = run(capsys, "--model", "gpt", "--stages", "4", "--json")
    assert code == 0 and json.loads(out)["schedule"] == "pipedream"
    assert [s["delay"] for s in json.loads(out)["stages"]] == [3, 2, 1, 0]
    assert TrainConfig(model="gpt").schedule == "pipedream"
    assert TrainConfig(model="gpt", schedule="layerpipe").schedule == "layerpipe"  # a flag wins
    assert TrainConfig(model="cnn1d").schedule == "layerpipe"
    code, out, _ = run(capsys, "--model", "gpt", "--stages", "4", "--schedule", "layerpipe", "--json")
    assert [s["delay"] for s in json.loads(out)["stages"]] == [6, 4, 2, 0]


def test_stash_versions_follow_the_recipes_accumulation(capsys):
    # gpt's recipe at 4 stages (pipedream delays 3,2,1,0) accumulates 4 microbatches per
    # update: one version per delayed stage, not d_k; --accumulate 1 gives the per-tick count
    code, out, _ = run(capsys, "--model", "gpt", "--stages", "4", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["accumulate"] == 4
    assert [s["delay"] for s in doc["stages"]] == [3, 2, 1, 0]
    assert [s["stash_versions"] for s in doc["stages"]] == [1, 1, 1, 0]
    code, out, _ = run(capsys, "--model", "gpt", "--stages", "4", "--json", "--accumulate", "1")
    assert [s["stash_versions"] for s in json.loads(out)["stages"]] == [3, 2, 1, 0]
    code, out, _ = run(capsys, "--model", "gpt", "--stages", "4")
    assert "one per update: ceil(delay / 4)" in out


def test_model_options_as_train_takes_them(capsys):
    # the recipe's 8-stage GPT (n_layer=6): delays 7..0, four ticks per update
    code, out, _ = run(capsys, "--model", "gpt", "--stages", "8", "--model-option", "n_layer=6", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["num_layers"] == 8 and doc["accumulate"] == 4
    assert [s["stash_versions"] for s in doc["stages"]] == [2, 2, 2, 1, 1, 1, 1, 0]
    from layerpipe.models import build_model

    model = build_model("gpt", n_layer=6)
    assert doc["totals"]["params"] == sum(p.numel() for p in model.parameters())


def test_default_json(capsys):
    code, out, _ = run(capsys, "--json")
    assert code == 0
    doc = json.loads(out)  # exactly one JSON object
    assert doc["num_stages"] == 4 and doc["schedule"] == "layerpipe"
    layer_keys = {"stage", "downstream_stages", "delay", "name", "params", "stash_versions", "bytes"}
    assert all(layer_keys <= set(l) for l in doc["layers"])
    assert all(set(l["bytes"]) == {"stash", "ema", "latest"} for l in doc["layers"])
    assert {"stages", "totals", "retiming", "tick_schedule"} <= set(doc)
    assert doc["retiming"]["legal"] is True


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("plan_layers4.json", ["--layers", "4"]),
        ("plan_layers6_stages123_pipedream.json", ["--layers", "6", "--stages", "1,2,3", "--schedule", "pipedream"]),
    ],
)
def test_golden_json(capsys, name, argv):
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    doc = json.loads(out)
    path = GOLDEN / name
    if UPDATE:
        path.write_text(json.dumps(doc, indent=2) + "\n")
    assert doc == json.loads(path.read_text())


def test_golden_values_are_method_md():
    """The golden files hold the worked examples, not just whatever the code printed once."""
    four = json.loads((GOLDEN / "plan_layers4.json").read_text())
    assert [l["delay"] for l in four["layers"]] == [6, 4, 2, 0]
    assert four["retiming"]["registers"] == {"forward": [1, 1, 1], "backward": [1, 1, 1], "label": 3}
    six = json.loads((GOLDEN / "plan_layers6_stages123_pipedream.json").read_text())
    assert [l["downstream_stages"] for l in six["layers"]] == [2, 1, 1, 0, 0, 0]
    assert [l["delay"] for l in six["layers"]] == [2, 1, 1, 0, 0, 0]


def test_verify_planned_delays(capsys):
    code, out, _ = run(capsys, "--layers", "4", "--verify")
    assert code == 0 and out.startswith("legal: ")


def test_verify_surplus_is_legal(capsys):
    code, out, _ = run(capsys, "--layers", "4", "--delays", "7,5,3,0", "--verify")
    assert code == 0
    assert "surplus 1,1,1,0" in out


def test_verify_short_delays(capsys):
    code, out, err = run(capsys, "--layers", "4", "--delays", "7,5,1,0", "--verify")
    assert code == 1
    assert out == "layer 3 (stage 2) needs 2 delays, has 1\n" and err == ""


def test_verify_short_pipedream_multi_layer_stage(capsys):
    code, out, _ = run(capsys, "--layers", "6", "--stages", "1,2,3", "--schedule", "pipedream",
                       "--delays", "2,0,0", "--verify")
    assert code == 1 and out == "layer 2 (stage 1) needs 1 delays, has 0\n"


def test_short_delays_without_verify_still_fail(capsys):
    code, out, _ = run(capsys, "--layers", "4", "--delays", "6,3,2,0")
    assert code == 1 and "retiming: layer 2 (stage 1) needs 4 delays, has 3" in out


def test_verify_json(capsys):
    code, out, _ = run(capsys, "--layers", "4", "--delays", "6,4,1,0", "--verify", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["retiming"]["legal"] is False
    assert doc["retiming"]["short_loops"][0] == {"layer": 2, "stage": 2, "needs": 2, "has": 1}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "3", "--stages", "4"], "4 stages but only 3 layers"),
        (["--layers", "4", "--stages", "2,0,2"], "stage 1 is empty"),
        (["--layers", "4", "--stages", "1,2"], "the stages hold 3 layers (1,2) but the model has 4"),
        (["--layers", "4", "--stages", "0"], "--stages must be a positive number"),
        (["--layers", "4", "--stages", "two"], "--stages must be integers"),
        (["--layers", "x"], "--layers must be a positive integer"),
        (["--layers", "0"], "--layers must be a positive integer"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--layers", "4", "--delays", "6,4,2"], "3 delays given but the plan has 4 stages"),
        (["--layers", "4", "--delays", "6,4,x,0"], "--delays must be integers"),
        (["--layers", "4", "--delays", "6,4,2,-1"], "delays must be >= 0"),
        (["--layers", "4", "--microbatches", "0"], "--microbatches must be a positive integer"),
        (["--layers", "4", "--accumulate", "0"], "--accumulate must be a positive integer"),
        (["--layers", "4", "--model-option", "n_layer=6"], "--model-option needs --model"),
        (["--model", "gpt", "--model-option", "nope=1"], "model 'gpt' has no option nope"),
        (["--layers", "4", "--stages", "2", "--balance", "time"], "needs a model"),
        (["--layers", "4", "--png", "/nonexistent-dir/x.png"], "cannot write /nonexistent-dir/x.png"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("layerpipe plan: error: ")
    assert message in err


@pytest.mark.parametrize("argv", [["--schedule", "gpipe"], ["--balance", "flops"], ["--layers", "2", "--model", "mlp"]])
def test_argparse_rejects(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(["plan", *argv])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_png_and_balance_time(capsys, tmp_path):
    png = tmp_path / "schedule.png"
    code, out, err = run(capsys, "--model", "mlp", "--stages", "2", "--balance", "time", "--png", str(png),
                         "--microbatches", "3")
    assert code == 0 and "balanced by measured time" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in err


def test_module_entry_point_json():
    proc = subprocess.run(
        [sys.executable, "-m", "layerpipe", "plan", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["num_stages"] == 4 and isinstance(doc["layers"], list)
