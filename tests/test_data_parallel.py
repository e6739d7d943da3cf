"""Data parallelism x pipelining (`dp` R > 1) with real processes (gloo on loopback): K x R
processes on a (pp, dp) mesh equal the single-process engine with R times the microbatch;
a killed replica stops the run with a line naming stage and replica; checkpoints are one
file per stage and reshard over R; `layerpipe export` merges them into one state_dict.

The workers are those of tests/test_distributed.py (`launch_worker`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from test_distributed import assert_close_states, case, launch_worker, make_model, single_reference, train_spec

pytestmark = pytest.mark.distributed

# K = 2 stages x R = 2 replicas, b = 4 per replica; 59 samples: global microbatches of 8 and a
# last one of 3, split 2 / 1 (weights 2/3 and 1/3)
DP_CASES = [case(2, "stash", batch=4) | {"n": 59}, case(2, "ema", batch=4) | {"n": 59},
            case(2, "stash", opt="adam", batch=4) | {"n": 59}, case(2, "ema", opt="adam", batch=4) | {"n": 59},
            # gradient accumulation, summed in .grad: each tick's all-reduce re-reduces the kept
            # sum (shares summing to 1), so only the new gradients are added
            case(2, "ema", "pipedream", batch=4, comp=["accumulate:every=2"]) | {"n": 59}]


@pytest.mark.timeout(150)
def test_dp2_pp2_equals_the_single_process_engine_with_twice_the_microbatch(tmp_path):
    K, R = 2, 2
    spec = {"out": str(tmp_path), "cases": DP_CASES, "dp": R}
    result = launch_worker("cases", spec, K * R, tmp_path, dp=R, deadline=140)
    assert result.returncode == 0, result.message
    for c, cs in enumerate(DP_CASES):
        ref = single_reference(cs | {"batch": R * cs["batch"]})
        got = [torch.load(tmp_path / f"case{c}-rank{r}.pt") for r in range(K * R)]
        # replica 0 of every stage (rank = stage * R + replica) against the single process
        merged = {}
        for k in range(K):
            merged.update(got[k * R]["state"])
        assert_close_states(merged, ref["state"], what=str(cs))
        # the replicas of a stage hold the same weights and the same weight history, bit for bit
        for k in range(K):
            for j in range(1, R):
                a, b = got[k * R], got[k * R + j]
                for name in a["state"]:
                    assert torch.equal(a["state"][name], b["state"][name]), (cs, k, j, name)
                assert repr(a["history"]) == repr(b["history"]), (cs, k, j)
        # the global microbatch loss is the replicas' losses weighted by their shares (the
        # weights are those of the last epoch)
        last = [got[(K - 1) * R + j] for j in range(R)]
        m = len(last[0]["loss_weights"])
        losses = [sum(w * l for w, l in zip(ws, ls)) for ws, ls in
                  zip(zip(*[g["loss_weights"] for g in last]), zip(*[g["losses"][-m:] for g in last]))]
        assert len(losses) == m == 8
        assert losses == pytest.approx(ref["losses"][-len(losses):], rel=1e-5)
        assert last[0]["loss_weights"][-1] == pytest.approx(2 / 3) and last[1]["loss_weights"][-1] == pytest.approx(1 / 3)
        # test evaluation on replica 0's pipeline only
        assert last[0]["test"][0] == pytest.approx(ref["test"][0], rel=1e-5) and last[1]["test"] is None
        assert got[0]["stats"]["test_accuracy"] == ref["test"][1]
        assert got[0]["tick"] == ref["tick"]


@pytest.mark.timeout(90)
def test_a_killed_replica_stops_the_run_naming_stage_and_replica(tmp_path):
    start = time.monotonic()
    # rank 2 = stage 1 replica 0 dies without a word in the middle of the first epoch
    result = launch_worker("train", train_spec(tmp_path / "run", 2, dp=2, timeout=30), 4, tmp_path,
                           env={"LAYERPIPE_FAULT": "2:exit:5"}, grace=10, dp=2)
    assert result.returncode == 1
    # the launcher's line, or (if a peer's report came first) the failure the peers recorded
    assert result.message in ("stage 1 replica 0 exited with code 3 without reporting an error",
                              "stage 1 replica 0 is gone: its connection closed (the process crashed or was killed)"), \
        result.message
    # its replica (all-reduce) and its upstream neighbour (messages) noticed at once, not after
    # the 30 s timeout, and every process left by itself
    assert result.codes[2] == 3 and [result.codes[r] for r in (0, 1, 3)] == [2, 2, 2], result.codes
    assert time.monotonic() - start < 25


@pytest.mark.timeout(90)
def test_a_raising_replica_is_named_by_its_mesh_coordinates(tmp_path):
    result = launch_worker("train", train_spec(tmp_path / "run", 2, dp=2, timeout=30), 4, tmp_path,
                           env={"LAYERPIPE_FAULT": "3:raise:4"}, grace=10, dp=2)
    assert result.returncode == 1
    assert result.message == "stage 1 replica 1 failed: RuntimeError: injected fault at tick 4", result.message
    assert result.codes == [2, 2, 2, 2], result.codes


# -- checkpoints: one file per stage, written by replica 0, read by every replica -------------------------
def _load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.timeout(400)
def test_checkpoints_resume_exactly_and_reshard_over_replicas(tmp_path):
    # 64 samples, global microbatch 8 (2 x 4, or 1 x 8): 8 microbatches + a drain of 2 ticks per
    # epoch, so tick 25 is in the third epoch, after the checkpoint of epoch 2
    dp2 = {"epochs": 3, "batch_size": 4}
    dp1 = {"epochs": 3, "batch_size": 8}
    whole_dir = tmp_path / "whole"
    whole = launch_worker("train", train_spec(whole_dir, 2, dp=2, config=dp2, checkpoint_every=1,
                                              save=str(tmp_path / "whole.pt")), 4, tmp_path, dp=2, deadline=150)
    assert whole.returncode == 0, whole.message
    marker = json.loads((whole_dir / "checkpoint.json").read_text())
    assert (marker["stages"], marker["dp"], marker["world_size"], marker["epoch"]) == (2, 2, 4, 3)
    assert marker["files"] == ["checkpoint-stage0-epoch3.pt", "checkpoint-stage1-epoch3.pt"]
    want = _load(tmp_path / "whole.pt")

    # export: one plain state_dict that the single-process model loads, equal to the run's weights
    out = subprocess.run([sys.executable, "-m", "layerpipe", "export", str(whole_dir), "--out",
                          str(tmp_path / "model.pt")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    model = make_model("mlp")
    model.load_state_dict(_load(tmp_path / "model.pt"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name

    # killed after the checkpoint of epoch 2 (stage 1 replica 0), resumed at R = 2: bit for bit
    run = tmp_path / "killed"
    killed = launch_worker("train", train_spec(run, 2, dp=2, config=dp2, checkpoint_every=1), 4, tmp_path,
                           env={"LAYERPIPE_FAULT": "2:exit:25"}, grace=10, dp=2, deadline=150)
    assert killed.returncode == 1 and "stage 1 replica 0" in killed.message, killed.message
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] == 2
    shutil.copytree(run, tmp_path / "reshard")
    resumed = launch_worker("train", train_spec(run, 2, dp=2, config=dp2, resume=True, checkpoint_every=1,
                                                save=str(tmp_path / "resumed.pt")), 4, tmp_path, dp=2, deadline=150)
    assert resumed.returncode == 0, resumed.message
    got = _load(tmp_path / "resumed.pt")
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name

    # the same checkpoint resumed with R = 1 (same global microbatch): equal to 1e-5
    reshard = launch_worker("train", train_spec(tmp_path / "reshard", 2, config=dp1, resume=True,
                                                save=str(tmp_path / "reshard.pt")), 2, tmp_path, deadline=120)
    assert reshard.returncode == 0, reshard.message
    assert_close_states(_load(tmp_path / "reshard.pt"), want, what="R=2 -> 1")

    # and the reverse: saved with R = 1, resumed with R = 2
    r1 = tmp_path / "r1"
    killed1 = launch_worker("train", train_spec(r1, 2, config=dp1, checkpoint_every=1), 2, tmp_path,
                            env={"LAYERPIPE_FAULT": "1:exit:25"}, grace=10, deadline=120)
    assert killed1.returncode == 1
    assert json.loads((r1 / "checkpoint.json").read_text())["dp"] == 1
    up = launch_worker("train", train_spec(r1, 2, dp=2, config=dp2, resume=True, save=str(tmp_path / "up.pt")),
                       4, tmp_path, dp=2, deadline=150)
    assert up.returncode == 0, up.message
    assert_close_states(_load(tmp_path / "up.pt"), want, what="R=1 -> 2")
    # a different global microbatch is refused with one line
    bad = launch_worker("train", train_spec(r1, 2, dp=2, config=dp1, resume=True), 4, tmp_path, dp=2, deadline=120)
    assert bad.returncode == 1 and "global microbatch=8 (1 x 8; now 2 x 8)" in bad.message, bad.message


@pytest.mark.timeout(150)
def test_cli_dp_gives_the_single_process_result_with_the_global_microbatch(tmp_path):
    from test_distributed import CLI_ARGS, run_cli

    from layerpipe.training import TrainConfig, train

    out = run_cli([*CLI_ARGS, "--nproc", "4", "--stages", "2", "--dp", "2", "--batch-size", "32", "--json",
                   "--run-dir", str(tmp_path / "dist")])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = train(TrainConfig(model="mlp", dataset="digits", samples=300, epochs=2, weights="stash", stages="2",
                                 batch_size=64), run_dir=tmp_path / "single", progress=False).summary()
    finally:
        torch.set_num_threads(threads)
    for key in ("test_accuracy", "weight_history_bytes", "stash_bytes", "parameter_bytes", "stages", "delays"):
        assert got[key] == want[key], key
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()[1:]]
    single = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert [r["train_loss"] for r in records] == pytest.approx([r["train_loss"] for r in single], rel=1e-5)


@pytest.mark.timeout(90)
def test_a_frozen_replica_is_named_after_the_timeout(tmp_path):
    # stage 1 replica 1 hangs: its replica waits in the gradient all-reduce, its upstream
    # neighbour for a gradient; both time out, follow "waits for" and name the frozen one
    result = launch_worker("train", train_spec(tmp_path / "run", 2, dp=2, timeout=4), 4, tmp_path,
                           env={"LAYERPIPE_FAULT": "3:hang:5"}, grace=12, dp=2)
    assert result.returncode == 1
    assert result.message.startswith("stage 1 replica 1 sent nothing for 4 s"), result.message
    assert result.codes == [2, 2, 2, 2], result.codes
