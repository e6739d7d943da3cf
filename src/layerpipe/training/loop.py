"""The one training loop, for both engines.

    from layerpipe.training import TrainConfig, train
    result = train(TrainConfig(model="cnn1d", stages="4", weights="ema"))
    print(result.test_accuracy, result.weight_history_bytes)

Each epoch visits the training set in a seeded order (the same order in every process of
the distributed runtime), one microbatch per tick, then drains the pipeline so that the
evaluation, the epoch record and any checkpoint see every gradient applied. A drain costs
2(K-1) ticks per epoch, well under 1% of an MNIST-1D epoch at K = 4. Under torchrun or
`layerpipe train --nproc K` (WORLD_SIZE in the environment), or with `distributed` options,
each process runs one stage (`engines.DistributedEngine`); otherwise all stages run here
(`engines.LocalEngine`). Same numbers, same result.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerpipe.engine.batch import num_samples, to_device
from layerpipe.engine.distributed import World
from layerpipe.errors import LayerpipeError
from layerpipe.plan import stage_delays
from layerpipe.report.outputs import clean_stale_temp, write_status
from layerpipe.report.records import MetricsLog, atomic_torch_save
from layerpipe.training.build import build, epoch_order
from layerpipe.training.checkpoint import load_checkpoint, save_checkpoint
from layerpipe.training.config import TrainConfig
from layerpipe.training.engines import CustomModel, DistributedEngine, Engine, LocalEngine, stage_device
from layerpipe.training.lr import epoch_lr, set_lr, step_lr_setter

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    config: dict[str, Any]
    stages: list[int]
    delays: list[int]
    #: samples per microbatch and replica this run trained with (see TrainConfig.microbatch)
    microbatch: int = 0
    #: microbatches whose gradients made one update (see TrainConfig.accumulation)
    accumulation: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: float = 0.0
    test_loss: float = 0.0
    weight_history_bytes: int = 0
    stash_bytes: int = 0
    parameter_bytes: int = 0
    seconds: float = 0.0
    run_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {
            "test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
            "weight_history_bytes": self.weight_history_bytes, "stash_bytes": self.stash_bytes,
            "parameter_bytes": self.parameter_bytes, "stages": self.stages, "delays": self.delays,
            "microbatch": self.microbatch, "accumulation": self.accumulation,
            "weights": c["weights"], "schedule": c["schedule"], "model": c["model"], "dataset": c["dataset"],
            "epochs": c["epochs"], "seed": c["seed"], "seconds": self.seconds,
            "seconds_per_epoch": (sum(r["seconds"] for r in self.history) / len(self.history)) if self.history else 0.0,
            "run_dir": self.run_dir,
        }


def start_engine(config: TrainConfig, distributed: dict[str, Any] | None, custom: CustomModel | None = None):
    """(engine, data) for this process: every stage here, or this process's stage."""
    world = World.from_env()
    if distributed is None and world is None:
        model, data, loss = build(config) if custom is None else custom.build(config)
        split = custom.split_options(model, data, config) if custom is not None else {}
        return LocalEngine(model, config, loss, **split), data
    options = dict(distributed or {})
    world = options.pop("world", None) or world or World()
    builder = options.pop("builder", None) or build
    if custom is not None:
        builder = custom.build
    device = stage_device(config.device, world)
    # the whole model is built on the CPU in every process; only this stage's layers move to
    # the device (a GPU never holds the whole model)
    local = dataclasses.replace(config, device="cpu")
    model, data, loss = builder(local)
    config.dataset = local.dataset  # build() fills in the default dataset
    if custom is not None:
        options.update(custom.split_options(model, data, config))
    return DistributedEngine.start(config, model, data, loss, world, device, **options), data


def train(
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    progress: bool = True,
    save: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    distributed: dict[str, Any] | None = None,
    custom: CustomModel | None = None,
) -> TrainResult:
    """Train as `config` says; write metrics (and plots) to `run_dir` when given.

    `save` receives the trained model's state_dict, written atomically at the end only, so
    a run that diverges never overwrites a good file. `checkpoint_every` N writes a
    checkpoint to `run_dir` every N epochs (see `training.checkpoint`); `resume` continues
    from the last one and ends with the weights an uninterrupted run would have.
    `on_epoch(record)` is called after each epoch's record (and checkpoint), on the main
    process. `distributed`: options of the distributed engine (timeout, backend, staging,
    forced_exit, world, builder, dp); under torchrun it is used even when None. `{"dp": R}`:
    R data-parallel replicas of every stage (K x R processes; `config.batch_size` is per
    replica, the global microbatch R x batch_size). `custom`: the user's model and data
    instead of the zoo's (see `engines.CustomModel`).
    """
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    engine, data = start_engine(config, distributed, custom)
    try:
        result = _train(engine, data, config, run_dir, progress, save, checkpoint_every, resume, on_epoch)
        engine.close()
    except BaseException as exc:
        failure = engine.fail(exc)
        _mark_failed(engine, run_dir, failure)
        if failure is exc:
            raise
        raise failure from (None if failure.__class__ is exc.__class__ else exc)
    result.seconds = time.perf_counter() - start
    if result.run_dir and engine.rank == 0:
        plot_learning_curve(config, result.history, Path(result.run_dir))
        write_status(result.run_dir, "complete")
    return result


def _mark_failed(engine: Engine, run_dir, exc: BaseException) -> None:
    """run_dir/status.json says how the run ended (the main process's view)."""
    import os

    from layerpipe.report.outputs import read_status

    if not run_dir or engine.rank != 0:
        return
    status = read_status(run_dir)
    if not status or status.get("status") != "running" or status.get("pid") != os.getpid():
        return  # refused before it started (a bad checkpoint, say): the folder's run is untouched
    interrupted = isinstance(exc, KeyboardInterrupt)
    reason = (str(exc) if isinstance(exc, LayerpipeError) else f"{type(exc).__name__}: {exc}").splitlines()
    write_status(run_dir, "interrupted" if interrupted else "failed", reason[0] if reason else type(exc).__name__)


def _train(engine: Engine, data, config: TrainConfig, run_dir, progress: bool, save, checkpoint_every: int,
           resume: bool, on_epoch) -> TrainResult:
    main = engine.rank == 0
    device = torch.device(config.device)
    # what exact stashing would hold with this partition (also reported for sync and ema runs)
    stash_delays = stage_delays(len(engine.stage_sizes), config.schedule)
    microbatch = config.microbatch(max(engine.delays), engine.dp)
    accumulation = config.accumulation(max(engine.delays), engine.dp)
    if accumulation > 1 and main:
        log.info("microbatch %d, %d per update (--batch-size %d): the largest delay, %d ticks, keeps the oldest "
                 "gradient within --max-stale-samples %d", microbatch, accumulation, config.batch_size,
                 max(engine.delays), config.max_stale_samples)
    result = TrainResult(config.to_dict(), engine.stage_sizes, engine.delays, microbatch, accumulation=accumulation,
                         stash_bytes=sum(d * b for d, b in zip(stash_delays, engine.stage_parameter_bytes)),
                         parameter_bytes=sum(engine.stage_parameter_bytes))
    shared = engine.share("run_dir", str(run_dir) if run_dir else "")  # rank 0's folder everywhere
    run_path = Path(shared) if shared else None
    if run_path and main and run_path.is_dir():
        clean_stale_temp(run_path)  # left by a write a kill cut short; before anything here writes
    first_epoch = _resume(engine, config, run_path, result) if resume else 0
    peak_history = _agree(engine, first_epoch)
    if run_path and main:  # from here on the folder holds this run, incomplete until it ends
        write_status(run_path, "running")
    metrics = MetricsLog(run_path / "metrics.jsonl", config.to_dict()) if run_path and main else None
    for record in result.history if metrics else []:
        metrics.write(record)
    # stage 0 reads the inputs and the last stage the labels: only they need them on the device
    x_train = to_device(data.x_train, device) if engine.reads_inputs else data.x_train
    y_train = to_device(data.y_train, device) if engine.reads_labels else data.y_train
    stats, trained = None, False
    for epoch in range(first_epoch, config.epochs):
        trained = True
        epoch_start = time.perf_counter()
        set_lr(engine.optimizers(), engine.local_delays(), epoch_lr(config, epoch), config.stage_lr)
        # the global microbatches (R x batch_size with R replicas; each replica takes its slice)
        order = epoch_order(num_samples(data.x_train), microbatch * engine.dp, config.seed, epoch)
        bar = _progress_bar(len(order), f"epoch {epoch + 1}/{config.epochs}", progress and main)
        try:
            step_lr = step_lr_setter(config, epoch, len(order), engine.optimizers(), engine.local_delays(),
                                     config.stage_lr)
            losses = _run_epoch(engine, x_train, y_train, order, _both(bar.update if bar else None, step_lr),
                                max(0, config.sync_warmup - epoch * len(order)))
        finally:
            if bar:
                bar.close()
        seconds = time.perf_counter() - epoch_start
        stats = engine.epoch_stats(losses, engine.evaluate(data.x_test, data.y_test))
        if main:
            peak_history = max(peak_history, stats.weight_history_bytes)
            record_epoch(result, metrics, epoch, stats.train_loss, stats.test_loss, stats.test_accuracy,
                         seconds, peak_history)
        if run_path and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
            save_checkpoint(run_path, engine.stage_index, engine.stage_files, epoch + 1,
                            {"config": config.to_dict(), "engine": engine.state_dict(), "rng": torch.get_rng_state(),
                             "history": result.history if main else []}, engine.gather,
                            writer=engine.replica == 0, dp=engine.dp)
        if on_epoch is not None and main:
            on_epoch(result.history[-1])
    if not trained:  # nothing left to train (resumed at the end): evaluate anyway
        stats = engine.epoch_stats([], engine.evaluate(data.x_test, data.y_test))
    if main:
        result.test_loss, result.test_accuracy = stats.test_loss, stats.test_accuracy
        result.weight_history_bytes = peak_history
    if save:
        model_state = engine.model_state()
        if main:
            atomic_torch_save(model_state, save)
    result.run_dir = str(run_path) if run_path else None
    return result


def _resume(engine: Engine, config: TrainConfig, run_path: Path | None, result: TrainResult) -> int:
    """Load the committed checkpoint into the engine; the epoch to continue from."""
    if run_path is None:
        raise LayerpipeError("--resume needs a run folder")
    state = load_checkpoint(run_path, engine.stage_index, engine.stage_files, config, engine.dp)
    if int(state["epoch"]) > config.epochs:
        raise LayerpipeError(f"the checkpoint in {run_path} is at epoch {state['epoch']}, past --epochs {config.epochs}: "
                             f"nothing to train (resume with --epochs {state['epoch']} to report it, or more to continue)")
    if int(state["epoch"]) == config.epochs and engine.rank == 0:
        log.warning("the checkpoint in %s is at epoch %d of %d: nothing to train; reporting its result",
                    run_path, config.epochs, config.epochs)
    engine.load_state_dict(state["engine"])
    result.history = list(state["history"])
    torch.set_rng_state(state["rng"])  # dropout masks continue as they would have
    return int(state["epoch"])


def _agree(engine: Engine, first_epoch: int) -> int:
    """Every process must agree on the plan and the epoch; returns (on the main process) the
    weight-history bytes held at the start."""
    # history bytes of one replica's pipeline (the replicas hold the same)
    plans = engine.gather((engine.stage_sizes, engine.delays, first_epoch,
                           engine.history_bytes() if engine.replica == 0 else 0))
    if plans is None:
        return 0
    if len({repr(p[:3]) for p in plans}) != 1:
        raise LayerpipeError(f"the processes disagree on the plan or the checkpoint: {plans}")
    return sum(int(p[3]) for p in plans)


def _both(a: Callable[[], Any] | None, b: Callable[[], Any] | None) -> Callable[[], None] | None:
    if a is None or b is None:
        return a or b
    return lambda: (a(), b())  # type: ignore[func-returns-value]


def _run_epoch(engine: Engine, x: Any, y: Any, order: list, on_microbatch, sync_first: int) -> list:
    """One epoch; its first `sync_first` microbatches each drained before the next enters
    (no staleness: ordinary training, at the cost of idle stages), then the pipelined rest."""
    losses: list = []
    for idx in order[:sync_first]:
        losses += engine.run_epoch(x, y, [idx], on_microbatch)
    if len(order) > sync_first:
        losses += engine.run_epoch(x, y, order[sync_first:], on_microbatch)
    return losses


def record_epoch(result: TrainResult, metrics: MetricsLog | None, epoch: int, train_loss: float, test_loss: float,
                 test_accuracy: float, seconds: float, weight_history_bytes: int) -> dict[str, Any]:
    """The per-epoch record (one JSON line), appended to the result and the metrics log."""
    record = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "seconds": seconds,
        "weight_history_bytes": weight_history_bytes,
    }
    result.history.append(record)
    if metrics:
        metrics.write(record)
    log.info("epoch %d: %s", epoch + 1, record)
    return record


def plot_learning_curve(config: TrainConfig, history: list[dict[str, Any]], run_path: Path) -> None:
    """run_path/learning_curve.png: training and validation loss, and validation accuracy,
    per epoch. Without matplotlib (`layerpipe[plots]`): one warning line, no plot."""
    from layerpipe.report.plots import MissingExtra, run_curves

    try:
        run_curves(history, run_path / "learning_curve.png", title=f"{config.model} / {config.weights}")
    except MissingExtra as exc:
        log.warning("%s", exc)
    except OSError as exc:
        log.warning("learning curve not written: %s", exc)


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:  # tqdm only when shown: headless runs (benchmarks/gpu_check.py) need torch and numpy only
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="mb", dynamic_ncols=True)
