"""`layerpipe compare` end to end on a tiny task."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from layerpipe.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def test_compare_writes_table_plot_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAYERPIPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", "mlp", "--dataset", "digits", "--samples", "300", "--epochs", "1",
               "--weights", "sync,stash,ema", "--seeds", "0,1", "--stages", "2", "all", "--out", str(out), "--no-progress",
               "--schedule", "pipedream", "--model-option", "hidden=(32,)"])
    assert rc == 0
    md = (out / "results.md").read_text()
    # the command shown reruns the same thing: non-default flags and model options included
    assert "--schedule pipedream" in md and "--model-option hidden=(32,)" in md and "--lr-schedule" not in md
    assert md.count("| sync |") == 2 and md.count("| ema |") == 2  # one row per depth
    data = json.loads((out / "results.json").read_text())
    # the row shows the microbatch trained with and the mean test loss of the seeds' runs
    losses = [r["test_loss"] for r in data["runs"] if r["weights"] == "ema" and r["key"][0] == "2"]
    assert "| 64 | ema | " in md and f"| {sum(losses) / 2:.4f} ± " in md  # mlp: microbatch 64
    assert len(data["runs"]) == 2 * 3 * 2  # depths x strategies x seeds (sync reused)
    stash = [r for r in data["runs"] if r["weights"] == "stash" and r["key"][0] == "2"]  # steady state in 5 ticks
    assert all(r["weight_history_bytes"] == r["stash_bytes"] for r in stash)
    assert (out / "curves.png").stat().st_size > 1000 and not (out / "partial.json").exists()
    # the cross-task summary reads the same file: one row per depth, paired ema - stash from the runs
    summary = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results_summary.py"), str(out)],
                             capture_output=True, text=True, check=True).stdout.splitlines()[2:]
    assert len(summary) == 2
    by_key = {tuple(r["key"]): r["test_accuracy"] for r in data["runs"]}
    paired = [100 * (by_key[("2", "ema", s)] - by_key[("2", "stash", s)]) for s in (0, 1)]
    assert f"{sum(paired) / 2:+.2f} ± " in summary[0]


def test_compare_rejects_bad_strategy_before_running(capsys, tmp_path):
    rc = main(["compare", "--weights", "sync,nope", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "unknown weight strategy" in capsys.readouterr().err


def test_parallel_jobs_give_the_same_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPIPE_CACHE", str(tmp_path / "cache"))
    common = ["compare", "--model", "mlp", "--dataset", "digits", "--samples", "300", "--epochs", "1",
              "--weights", "sync,ema", "--seeds", "0,1", "--stages", "2", "3", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("one", "two"))
    assert [r["key"] for r in one] == [r["key"] for r in two]
    assert [r["test_accuracy"] for r in one] == [r["test_accuracy"] for r in two]
    assert [r["history"][-1]["train_loss"] for r in one] == [r["history"][-1]["train_loss"] for r in two]


def test_compare_rejects_zero_jobs(capsys, tmp_path):
    rc = main(["compare", "--jobs", "0", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "--jobs" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _run(weights, seed, accuracies, stages=(2, 1)):
    return {"weights": weights, "seed": seed, "stages": list(stages),
            "history": [{"test_accuracy": a, "test_loss": 1 - a} for a in accuracies]}


def test_samples_to_target_counts_epochs_to_sync_final(tmp_path):
    """Hand-made curves: sync reaches its final 0.90 (less 0.005) at epoch 2; the pipelined
    run at epoch 3 (1.50x); another seed's never does (a lower bound, marked >)."""
    runs = [_run("sync", 0, [0.5, 0.897, 0.9]), _run("ema", 0, [0.4, 0.8, 0.9]),
            _run("sync", 1, [0.5, 0.6, 0.9]), _run("ema", 1, [0.4, 0.5, 0.8])]
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samples_to_target.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| 2,1 | ema | 1.50, >1.00 | 1.25x (at least) |" in out.stdout
    loss = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samples_to_target.py"), str(tmp_path),
                           "--metric", "test_loss"], capture_output=True, text=True, timeout=60)
    assert "| 2,1 | ema | 1.50, >1.00 |" in loss.stdout  # lower is better: the same epochs
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs[1:2]}))
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samples_to_target.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no sync run" in bad.stderr
