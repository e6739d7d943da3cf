"""The distributed runtime against the single-process engine, with real processes (gloo on
loopback): same weights for K = 2, 3, 4 and every schedule; failures name the stage and end
every process in bounded time; a run killed after a checkpoint resumes to the same weights.

Run as a script, this file is the worker the tests launch (`python test_distributed.py MODE SPEC`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve()
pytestmark = pytest.mark.distributed

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


# -- small models and data, built identically in every process ------------------------------------
def make_model(kind: str = "mlp", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "bn":  # BatchNorm running statistics must follow the forward order exactly
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                             nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(),
                         nn.Linear(12, 3))


def make_data(n: int = 58, n_test: int = 40, seed: int = 1) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return SimpleNamespace(x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:], num_classes=3)


def single_reference(case: dict) -> dict:
    """The single-process engine on the same case, epoch by epoch as `train.train` runs it,
    on one thread as the workers (the kernels' reduction order then matches: bit for bit)."""
    from layerpipe import Pipeline
    from layerpipe.training import epoch_order, evaluate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _single_reference(case, Pipeline, epoch_order, evaluate)
    finally:
        torch.set_num_threads(threads)


def _single_reference(case, Pipeline, epoch_order, evaluate) -> dict:

    model, data = make_model(case["model"]), make_data(n=case.get("n", 58))
    with fuse_small_stages(case.get("fused", False)):
        pipe = Pipeline(model, stages=case["stages"], weights=case["weights"], optimizer=OPTIMIZERS[case["opt"]],
                        loss_fn=F.cross_entropy, schedule=case["schedule"], compensation=case.get("comp"),
                        fused_update=case.get("fused", False))
    losses = []
    for epoch in range(case["epochs"]):
        for idx in epoch_order(len(data.x_train), case["batch"], 0, epoch):
            losses.extend(float(v) for v in pipe.step(data.x_train[idx], data.y_train[idx]).losses.values())
        for info in pipe.flush():
            losses.extend(float(v) for v in info.losses.values())
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, F.cross_entropy)
    return {"state": model.state_dict(), "losses": losses, "test": (test_loss, test_acc), "tick": pipe.tick,
            "stages": pipe.stage_sizes, "delays": pipe.delays}


@contextlib.contextmanager
def fuse_small_stages(on: bool):
    """`fused_update` on these small models: their stages are under its 1 MiB floor."""
    import layerpipe.engine.fused as fused

    floor = fused.MIN_FUSED_BYTES
    fused.MIN_FUSED_BYTES = 0 if on else floor
    try:
        yield
    finally:
        fused.MIN_FUSED_BYTES = floor


# -- worker side ---------------------------------------------------------------------------------------
def worker_cases(spec: dict) -> None:
    """Run every case on one connection; write each stage's weights and numbers."""
    from layerpipe.engine.distributed import Comm, StageWorker, World
    from layerpipe.engine.single import resolve_strategy
    from layerpipe.plan import sequential_spec
    from layerpipe.training import epoch_order

    torch.set_num_threads(1)
    world = World.from_env()
    dp = spec.get("dp", 1)
    comm = Comm(world, timeout=spec.get("timeout", 30), staging=spec.get("staging"), dp=dp)
    out = Path(spec["out"])
    for c, case in enumerate(spec["cases"]):
        model, data = make_model(case["model"]), make_data(n=case.get("n", 58))
        strategy, schedule = resolve_strategy(case["weights"], case["schedule"])
        with fuse_small_stages(case.get("fused", False)):
            worker = StageWorker(comm, model, sequential_spec(model, case["stages"], schedule), weights=strategy,
                                 optimizer=OPTIMIZERS[case["opt"]], loss_fn=F.cross_entropy, sample=data.x_train[:2],
                                 compensation=case.get("comp"), fused_update=case.get("fused", False))
        losses = []
        for epoch in range(case["epochs"]):
            order = epoch_order(len(data.x_train), case["batch"] * dp, 0, epoch)  # global microbatches
            losses += [float(v) for v in worker.run_epoch(data.x_train, data.y_train, order)]
        test = worker.evaluate(data.x_test, data.y_test)
        stats = worker.epoch_stats([], test)
        torch.save({"state": worker.module.state_dict(), "losses": losses, "test": test, "tick": worker.tick,
                    "stats": vars(stats) if stats else None, "stages": worker.stage_sizes, "delays": worker.delays,
                    "loss_weights": worker.loss_weights, "history": worker.stage.state_dict()["strategy"],
                    "fused_steps": worker.stage.fused.fused_steps if worker.stage.fused is not None else 0},
                   out / f"case{c}-rank{comm.rank}.pt")
    comm.close()


def build_synthetic(config):
    """A `training.build` stand-in for the distributed engine: (model, data, loss)."""
    config.dataset = config.dataset or "synthetic"
    return make_model("mlp"), make_data(n=64), F.cross_entropy


def worker_train(spec: dict) -> None:
    """`train` with one stage per process, as the CLI runs it: on failure, report one line and leave."""
    from layerpipe.cli.launch import report_failure
    from layerpipe.errors import LayerpipeError
    from layerpipe.training import TrainConfig, train

    torch.set_num_threads(1)
    config = TrainConfig(**spec["config"])
    try:
        result = train(config, run_dir=spec["run_dir"], progress=False, save=spec.get("save"),
                       checkpoint_every=spec.get("checkpoint_every", 0), resume=spec.get("resume", False),
                       distributed={"timeout": spec.get("timeout", 30), "builder": build_synthetic,
                                    "forced_exit": lambda msg: os._exit(2), "dp": spec.get("dp", 1)})
    except LayerpipeError as exc:
        report_failure(str(exc))
        os._exit(2)
    if int(os.environ["RANK"]) == 0:
        Path(spec["run_dir"], "summary.json").write_text(json.dumps(result.summary()))


# -- test side ---------------------------------------------------------------------------------------------
def launch_worker(mode: str, spec: dict, nproc: int, tmp_path: Path, env: dict | None = None, deadline: float = 90,
                  grace: float = 1.0, dp: int = 1):
    from layerpipe.cli.launch import launch

    spec_path = tmp_path / f"spec-{mode}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    child_env = dict(os.environ, **(env or {}))
    return launch([sys.executable, str(HERE), mode, str(spec_path)], nproc, env=child_env,
                  threads_per_process=1, deadline=deadline, grace=grace, dp=dp)


def merged_state(out: Path, c: int, nproc: int) -> dict:
    state = {}
    for r in range(nproc):
        state.update(torch.load(out / f"case{c}-rank{r}.pt")["state"])
    return state


def assert_close_states(got: dict, want: dict, rtol: float = 1e-5, what: str = "") -> None:
    assert list(got) == list(want), what
    for name in want:
        a, b = got[name].double(), want[name].double()
        scale = b.abs().max().clamp_min(1e-12)
        assert (a - b).abs().max() / scale <= rtol, f"{what} {name}: relative difference {(a - b).abs().max() / scale:.2e}"


def case(stages, weights, schedule="layerpipe", model="mlp", opt="sgd", epochs=2, batch=8, comp=None, fused=False):
    return dict(stages=stages, weights=weights, schedule=schedule, model=model, opt=opt, epochs=epochs, batch=batch,
                comp=comp, fused=fused)


# the transformer recipe's compensation (Muon with less momentum on delayed stages, PipeMare),
# with the 1F1B timing it runs under
RECIPE_COMP = ["muon:lr=0.02,delayed_momentum=depth", "pipemare:anneal=20,warmup=3"]


# K processes each run several cases on one connection (process start-up dominates on 2 cores)
CASES = {
    2: [case(2, "stash"), case(2, "ema", opt="adam"), case(2, "sync"), case(2, "ema", "pipedream", model="bn"),
        case(2, "latest", batch=5), case(2, "ema", "pipedream", comp=RECIPE_COMP),
        case(2, "stash", "pipedream", comp=["accumulate:every=2"]), case(2, "ema", fused=True),
        case(2, "stash", opt="adam", fused=True)],
    3: [case(3, "stash", model="bn"), case(3, "ema"), case([2, 3, 2], "sync", opt="adam"),
        case(3, "stash", "pipedream", epochs=1), case(3, "stash", "pipedream", comp=RECIPE_COMP, epochs=1)],
    4: [case(4, "stash"), case(4, "ema", model="bn"), case([2, 2, 2, 1], "weight-ema", "pipedream", epochs=1)],
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_distributed_equals_single_process(nproc, tmp_path):
    spec = {"out": str(tmp_path), "cases": CASES[nproc], "staging": nproc == 3}  # K=3 also goes through CPU staging
    result = launch_worker("cases", spec, nproc, tmp_path)
    assert result.returncode == 0, result.message
    for c, cs in enumerate(CASES[nproc]):
        ref = single_reference(cs)
        assert_close_states(merged_state(tmp_path, c, nproc), ref["state"], what=str(cs))
        last = torch.load(tmp_path / f"case{c}-rank{nproc - 1}.pt")
        first = torch.load(tmp_path / f"case{c}-rank0.pt")
        assert last["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert last["test"][0] == pytest.approx(ref["test"][0], rel=1e-5)
        assert first["stats"]["test_accuracy"] == ref["test"][1]
        assert first["tick"] == ref["tick"] and first["stages"] == ref["stages"] and first["delays"] == ref["delays"]
        if cs["fused"]:  # every stage's updates fused but the optimizer's first
            assert all(torch.load(tmp_path / f"case{c}-rank{r}.pt")["fused_steps"] > 3 for r in range(nproc))


# -- failures: every process ends in bounded time, and the line names the stage --------------------------
def train_spec(run_dir: Path, k: int, **kw) -> dict:
    config = {"model": "mlp", "stages": str(k), "weights": "ema", "epochs": 2, "batch_size": 4, "optimizer": "sgd",
              "lr": 0.1}
    config.update(kw.pop("config", {}))
    return {"config": config, "run_dir": str(run_dir), **kw}


@pytest.mark.timeout(60)
def test_a_raising_middle_stage_stops_every_process(tmp_path):
    start = time.monotonic()
    result = launch_worker("train", train_spec(tmp_path / "run", 3, timeout=30), 3, tmp_path,
                           env={"LAYERPIPE_FAULT": "1:raise:5"}, grace=10)
    assert result.returncode == 1
    assert result.message == "stage 1 failed: RuntimeError: injected fault at tick 5", result.message
    # the other stages noticed at once (a closed connection, not the 30 s timeout) and left
    # by themselves with the failure line, before the launcher had to terminate them
    assert result.codes[0] == 2 and result.codes[2] == 2, result.codes
    assert time.monotonic() - start < 25


@pytest.mark.timeout(60)
def test_a_hanging_stage_is_named_after_the_timeout(tmp_path):
    start = time.monotonic()
    result = launch_worker("train", train_spec(tmp_path / "run", 3, timeout=4), 3, tmp_path,
                           env={"LAYERPIPE_FAULT": "1:hang:5"}, grace=12)
    assert result.returncode == 1
    assert result.message.startswith("stage 1 sent nothing for 4 s"), result.message
    # stages 0 and 2 time out and leave; stage 1's monitor sees the recorded failure and
    # forces its stuck compute thread out: nobody is left for the launcher to kill
    assert result.codes == [2, 2, 2], result.codes
    assert time.monotonic() - start < 35


# -- checkpoints: killed after a checkpoint, resumed, same weights as without the interruption ------------
@pytest.mark.timeout(90)
def test_resume_after_a_kill_gives_the_uninterrupted_weights(tmp_path):
    config = {"epochs": 3}
    whole = launch_worker("train", train_spec(tmp_path / "whole", 2, config=config, save=str(tmp_path / "whole.pt")),
                          2, tmp_path)
    assert whole.returncode == 0, whole.message
    # 16 microbatches and a drain of 2 ticks per epoch: tick 40 is in the third epoch,
    # after the checkpoint of epoch 2
    run = tmp_path / "killed"
    killed = launch_worker("train", train_spec(run, 2, config=config, checkpoint_every=1, timeout=30), 2, tmp_path,
                           env={"LAYERPIPE_FAULT": "1:exit:40"}, grace=10)
    # a stage that dies without a word: the launcher says how; stage 0 noticed at once (a
    # closed connection, not the 30 s timeout) and left by itself
    assert killed.returncode == 1 and killed.message.startswith("stage 1 exited with code 3"), killed.message
    assert killed.codes == [2, 3] and killed.seconds < 20
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] == 2
    resumed = launch_worker("train", train_spec(run, 2, config=config, resume=True, checkpoint_every=1,
                                                save=str(tmp_path / "resumed.pt")), 2, tmp_path)
    assert resumed.returncode == 0, resumed.message
    want, got = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    history = json.loads((run / "summary.json").read_text())
    assert history["epochs"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[1:]]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # only the last two checkpoints stay on disk
    assert sorted(p.name for p in run.glob("checkpoint-stage0-*.pt")) == ["checkpoint-stage0-epoch2.pt",
                                                                        "checkpoint-stage0-epoch3.pt"]


# -- the command line: `layerpipe train --nproc 2` ---------------------------------------------------------
CLI_ARGS = ["train", "--model", "mlp", "--dataset", "digits", "--samples", "300", "--epochs", "2", "--weights", "stash",
            "--no-progress"]


def run_cli(args: list[str], env: dict | None = None) -> "subprocess.CompletedProcess":
    import subprocess

    return subprocess.run([sys.executable, "-m", "layerpipe", *args], capture_output=True, text=True, timeout=100,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.timeout(120)
def test_cli_nproc_gives_the_single_process_result(tmp_path):
    from layerpipe.training import TrainConfig, train

    out = run_cli([*CLI_ARGS, "--nproc", "2", "--json", "--run-dir", str(tmp_path / "dist")])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1  # only rank 0 prints
    got = json.loads(lines[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = train(TrainConfig(model="mlp", dataset="digits", samples=300, epochs=2, weights="stash", stages="2"),
                     run_dir=tmp_path / "single", progress=False).summary()
    finally:
        torch.set_num_threads(threads)
    assert list(got) == list(want)
    for key in ("test_accuracy", "weight_history_bytes", "stash_bytes", "parameter_bytes", "stages", "delays"):
        assert got[key] == want[key], key
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
    assert (tmp_path / "dist" / "metrics.jsonl").exists()


@pytest.mark.timeout(120)
def test_cli_nproc_reports_a_failed_stage_in_one_line(tmp_path):
    out = run_cli([*CLI_ARGS, "--nproc", "2", "--run-dir", str(tmp_path)], env={"LAYERPIPE_FAULT": "1:raise:3"})
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("layerpipe train: error:")]
    assert errors == ["layerpipe train: error: stage 1 failed: RuntimeError: injected fault at tick 3"], out.stderr
    assert "Traceback" not in out.stderr


def _main(argv: list[str]) -> None:
    mode, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    {"cases": worker_cases, "train": worker_train}[mode](spec)


if __name__ == "__main__":
    _main(sys.argv[1:])
