"""`layerpipe.train_pipeline`: train your own model from your own script, in one process or
one process per stage (under `layerpipe launch --nproc K` or `torchrun --nproc-per-node K`).

    import layerpipe

    def make_model():                      # called in every process after torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, vocab_size=128))

    def make_data():                       # then this: x_train, y_train, x_test, y_test
        ...

    result = layerpipe.train_pipeline(make_model, make_data, loss_fn, split_points=["transformer.h.2"],
                                      weights="stash", optimizer="adam", lr=1e-3, epochs=2, batch_size=8)
    if result is not None:                 # rank 0 (or the only process)
        print(result.test_loss)

The same script runs all stages in one process (`python script.py`) or one stage per process
(`layerpipe launch --nproc 2 script.py`, `torchrun --nproc-per-node 2 script.py`), through
the one training loop (`layerpipe.training.train`), with the same numbers. Under a launcher a
failure ends every process with one line naming the stage (exit status 2).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from layerpipe.cli.launch import leave_now, leave_with_failure

from layerpipe.errors import LayerpipeError, PlanError

DATA_FIELDS = ("x_train", "y_train", "x_test", "y_test")


def train_pipeline(
    make_model: Callable[[], Any],
    make_data: Callable[[], Any],
    loss_fn: Callable[[Any, Any], Any],
    *,
    split_points: Sequence[str] | None = None,
    stages: int | Sequence[int] | None = None,
    example_inputs: Any = None,
    weights: str = "stash",
    schedule: str = "layerpipe",
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    warmup_epochs: int = 0,
    epochs: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    weight_options: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    save: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    progress: bool = False,
    timeout: float = 60.0,
    backend: str = "auto",
    dp: int = 1,
):
    """Train `make_model()` on `make_data()` pipelined; the `TrainResult` on rank 0 (or the
    only process), None on the other ranks.

    Args:
        make_model: builds the model (on the CPU); called in every process right after
            `torch.manual_seed(seed)`, so every process holds the same weights.
        make_data: called next, in every process: an object (or dict) with x_train, y_train,
            x_test, y_test. Inputs are a tensor, a tuple of positional tensors or a dict of
            keyword arguments (non-tensor values such as `use_cache=False` are passed as
            they are), with the samples along dim 0. Stage 0 reads the inputs, the last stage
            the targets.
        loss_fn: `loss_fn(model_output, target)`, a scalar; the mean of it over the test set
            is `result.test_loss` (accuracy only when the output is a tensor of class scores).
        split_points: submodule names where stages 1..K-1 begin (`layerpipe.split`), or
        stages: K (balanced by parameter count) or, for an nn.Sequential, layers per stage.
            Under a launcher the stage count must equal the number of processes (default:
            that number).
        example_inputs: one call of the model to trace and cut it with (default: the first
            `batch_size` training inputs). Pick a batch size no other dimension has: a
            boundary value's dim 0 is the batch when it has that size. Every microbatch must
            have the example's shape apart from the batch dimension.
        weights, schedule, weight_options: as `layerpipe.Pipeline`.
        optimizer, lr, momentum, weight_decay: "sgd", "adam" or "adamw" per stage.
        lr_schedule, warmup_epochs: "constant" or "cosine" per epoch, linear warm-up.
        epochs, batch_size, seed: the training set is visited in a seeded order each epoch,
            one microbatch of `batch_size` per tick, and the pipeline drained at the end.
        device: "cpu" or "cuda" (under a launcher: one GPU per local rank).
        threads: torch threads per process (None: as the launcher set).
        run_dir, save, checkpoint_every, resume, progress: as `layerpipe train`.
        timeout, backend: of the distributed runtime (seconds per wait; auto, gloo, nccl).
        dp: data-parallel replicas of every stage (under a launcher of K x dp processes);
            `batch_size` is then per replica, as `layerpipe train --dp`.

    A parameter read by stages in different processes (tied embeddings) is owned by its first
    reader and gives the single-process numbers (`engine.distributed.tied`).
    """
    from layerpipe.engine.distributed import World

    world = World.from_env()
    if world is not None:
        from layerpipe.cli.launch import LAUNCHER_PID_ENV, die_with_parent

        if os.environ.get(LAUNCHER_PID_ENV):
            die_with_parent()
    try:
        config, custom = _prepare(make_model, make_data, loss_fn, world, split_points=split_points, stages=stages,
                                  example_inputs=example_inputs, weights=weights, schedule=schedule,
                                  optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  lr_schedule=lr_schedule, warmup_epochs=warmup_epochs, epochs=epochs,
                                  batch_size=batch_size, seed=seed, device=device, threads=threads,
                                  weight_options=weight_options, dp=dp)
    except LayerpipeError as exc:
        if world is None or world.world_size == 1:
            raise
        leave_with_failure(exc, world.rank == 0, "layerpipe")
    from layerpipe.training import train

    if world is None:
        return train(config, run_dir=run_dir, progress=progress, save=save, checkpoint_every=checkpoint_every,
                     resume=resume, custom=custom)
    options = {"timeout": timeout, "backend": backend, "dp": dp,
               "forced_exit": lambda message: leave_now(message, command="layerpipe")}
    try:
        result = train(config, run_dir=run_dir, progress=progress and world.rank == 0, save=save,
                       checkpoint_every=checkpoint_every, resume=resume, distributed=options, custom=custom)
    except BaseException as exc:  # noqa: BLE001 - every failure: one line, every process leaves
        leave_with_failure(exc, world.rank == 0, "layerpipe")
    return result if world.rank == 0 else None


def _prepare(make_model, make_data, loss_fn, world, *, split_points, stages, example_inputs, seed, device,
             threads, weight_options, dp, **settings):
    """The TrainConfig and the CustomModel of a `train_pipeline` call."""
    import torch

    from layerpipe.training import CustomModel, TrainConfig

    for name, fn in (("make_model", make_model), ("make_data", make_data), ("loss_fn", loss_fn)):
        if not callable(fn):
            raise LayerpipeError(f"{name} must be a function, got {type(fn).__name__}")
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise LayerpipeError(f"dp must be a positive integer, got {dp!r}")
    if dp > 1 and world is None:
        raise LayerpipeError(f"dp={dp} needs {dp} processes per stage: run the script under "
                             "`layerpipe launch --nproc K*dp` or torchrun")
    if split_points is not None:
        if isinstance(split_points, str):
            raise PlanError(f"split_points is a list of submodule names, got the string {split_points!r}")
        if stages is not None:
            raise PlanError("give split_points or stages, not both")
        stage_text = str(len(split_points) + 1)
    elif stages is None:
        if world is None:
            raise PlanError("give split_points=[...] or stages=K (the number of pipeline stages)")
        stage_text = str(world.world_size // dp)
    elif isinstance(stages, int) and not isinstance(stages, bool):
        stage_text = str(stages)
    else:
        stage_text = ",".join(str(int(n)) for n in stages)
    config = TrainConfig(model="custom", dataset="custom", stages=stage_text, seed=seed, device=device,
                         threads=threads if threads is not None else 0, weight_options=dict(weight_options or {}),
                         compensation=[], **settings)

    def build(cfg: TrainConfig):
        torch.manual_seed(cfg.seed)
        model = make_model()
        if not isinstance(model, torch.nn.Module):
            raise LayerpipeError(f"make_model() must return an nn.Module, got {type(model).__name__}")
        data = _as_data(make_data())
        cfg.dataset = "custom"
        return model.to(cfg.device), data, loss_fn

    return config, CustomModel(build, list(split_points) if split_points is not None else None, example_inputs)


def _as_data(data: Any) -> SimpleNamespace:
    if isinstance(data, Mapping):
        missing = [f for f in DATA_FIELDS if f not in data]
        get = data.__getitem__
    elif isinstance(data, tuple) and len(data) == 4:
        return SimpleNamespace(**dict(zip(DATA_FIELDS, data)))
    else:
        missing = [f for f in DATA_FIELDS if not hasattr(data, f)]
        get = lambda f: getattr(data, f)  # noqa: E731
    if missing:
        raise LayerpipeError(f"make_data() must return x_train, y_train, x_test, y_test (an object, a dict or a "
                             f"4-tuple); missing {', '.join(missing)}")
    return SimpleNamespace(**{f: get(f) for f in DATA_FIELDS})


