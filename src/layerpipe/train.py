"""The training loop that ties data, model, plan, weight strategy and engine together.

    from layerpipe.train import TrainConfig, train
    result = train(TrainConfig(model="cnn1d", stages="4", weights="ema"))
    print(result.test_accuracy, result.weight_history_bytes)

Each epoch visits the training set in a seeded order (the same order in every process of
the distributed runtime), one microbatch per tick, then drains the pipeline so that the
evaluation, the epoch record and any checkpoint see every gradient applied. A drain costs
2(K-1) ticks per epoch, well under 1% of an MNIST-1D epoch at K = 4.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from layerpipe.errors import LayerpipeError
from layerpipe.plan import SCHEDULES, parse_stages, stage_delays
from layerpipe.weights import STRATEGIES

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "constant")
#: per-stage learning rate: "same" for every stage, or "inverse-delay": lr / d_k on stages
#: with a gradient delay d_k > 0 (PipeMare's observation: a stale gradient wants a smaller step)
STAGE_LRS = ("same", "inverse-delay")

#: per-model training recipes used when the user does not override them
# (threads: torch intra-op threads; 1 for the small models, whose kernels are too small to
# split and which slow down up to 5x on 2 threads when another process shares the cores)
RECIPES: dict[str, dict[str, Any]] = {
    "mlp": dict(epochs=40, batch_size=64, optimizer="adam", lr=1e-3, threads=1),
    "cnn1d": dict(epochs=30, batch_size=64, optimizer="adam", lr=2e-3, threads=1),
    "resnet18": dict(epochs=5, batch_size=64, optimizer="sgd", lr=0.05, threads=0),
    "snn": dict(epochs=25, batch_size=64, optimizer="adam", lr=3e-3, threads=1),
    "gpt": dict(epochs=2, batch_size=16, optimizer="adamw", lr=1e-3, threads=0),
}
_FALLBACK_RECIPE = dict(epochs=10, batch_size=32, optimizer="adam", lr=1e-3, threads=0)


@dataclass
class TrainConfig:
    """One training run. `None` fields take the model's recipe (see RECIPES)."""

    model: str = "cnn1d"
    #: dataset name; None: the model's default dataset
    dataset: str | None = None
    #: "K" (K balanced stages), "2,1,3,1" (layers per stage) or "all" (one layer per stage)
    stages: str = "4"
    weights: str = "ema"
    schedule: str = "layerpipe"
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    #: "cosine": lr decays to 0 over the run with a cosine, per epoch; "constant"
    lr_schedule: str = "cosine"
    #: epochs of linear learning-rate warm-up (PipeMare: stale gradients hurt most early)
    warmup_epochs: int = 0
    #: "same" or "inverse-delay" (see STAGE_LRS)
    stage_lr: str = "same"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    #: seed of dataset generation and splits, kept fixed across --seed so that runs over
    #: seeds compare on the same data (42: the published MNIST-1D)
    data_seed: int = 42
    device: str = "cpu"
    #: torch intra-op threads (0: torch's default, all cores); None: the model's recipe
    threads: int | None = None
    #: dataset size (MNIST-1D: total samples generated); None: the dataset's default
    samples: int | None = None
    data_dir: str | None = None
    #: keyword options of the model's builder, e.g. {"norm": False}
    model_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        recipe = RECIPES.get(self.model, _FALLBACK_RECIPE)
        for key, value in recipe.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.weights not in STRATEGIES:
            raise LayerpipeError(f"unknown weight strategy {self.weights!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.schedule not in SCHEDULES:
            raise LayerpipeError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise LayerpipeError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise LayerpipeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.stage_lr not in STAGE_LRS:
            raise LayerpipeError(f"unknown --stage-lr {self.stage_lr!r}; choose one of: {', '.join(STAGE_LRS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise LayerpipeError(f"unknown --lr-schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        if not self.lr or self.lr <= 0:
            raise LayerpipeError(f"--lr must be positive, got {self.lr}")
        parse_stages(self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_blocks(model: nn.Sequential) -> nn.Sequential:
    """The same network with every nested `nn.Sequential` block replaced by its layers (same
    module objects, same parameters), so that it can be cut into more stages."""
    layers: list[nn.Module] = []
    for block in model:
        layers.extend(split_blocks(block) if isinstance(block, nn.Sequential) else [block])
    return nn.Sequential(*layers)


def make_optimizer_factory(config: TrainConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The factory the engine calls once per stage with that stage's parameters."""
    name, lr, wd = config.optimizer, float(config.lr), config.weight_decay

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)

    return factory


def epoch_lr(config: TrainConfig, epoch: int) -> float:
    """Learning rate of an epoch (0-based): linear warm-up, then cosine decay or constant."""
    base = float(config.lr)
    if epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    if config.lr_schedule == "constant":
        return base
    span = max(1, config.epochs - config.warmup_epochs)
    return base * 0.5 * (1 + math.cos(math.pi * (epoch - config.warmup_epochs) / span))


def set_lr(optimizers: Iterable[torch.optim.Optimizer | None], delays: Iterable[int], lr: float, stage_lr: str) -> None:
    """Give each stage's optimizer the epoch's learning rate, scaled per stage by `stage_lr`."""
    for opt, delay in zip(optimizers, delays):
        if opt is not None:
            scaled = lr / delay if stage_lr == "inverse-delay" and delay > 0 else lr
            for group in opt.param_groups:
                group["lr"] = scaled


def epoch_order(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Index tensors of the epoch's microbatches: a permutation seeded by (seed, epoch), the
    same in every process. The last, smaller batch is kept."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return list(perm.split(batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn, batch_size: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on (x, y); for sequences, accuracy per token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        total_loss += float(loss_fn(out, yb)) * len(xb)
        correct += int((out.argmax(-1) == yb).sum())
        count += yb.numel()
    model.train(was_training)
    return total_loss / len(x), correct / count


@dataclass
class TrainResult:
    config: dict[str, Any]
    stages: list[int]
    delays: list[int]
    history: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: float = 0.0
    test_loss: float = 0.0
    weight_history_bytes: int = 0
    stash_bytes: int = 0
    parameter_bytes: int = 0
    seconds: float = 0.0
    run_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "weight_history_bytes": self.weight_history_bytes,
            "stash_bytes": self.stash_bytes,
            "parameter_bytes": self.parameter_bytes,
            "stages": self.stages,
            "delays": self.delays,
            "weights": self.config["weights"],
            "schedule": self.config["schedule"],
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "epochs": self.config["epochs"],
            "seed": self.config["seed"],
            "seconds": self.seconds,
            "seconds_per_epoch": (sum(r["seconds"] for r in self.history) / len(self.history)) if self.history else 0.0,
            "run_dir": self.run_dir,
        }


def build(config: TrainConfig):
    """Model, dataset and loss for a config, seeded: (model, dataset, loss_fn)."""
    from layerpipe.data import load_dataset, loss_fn
    from layerpipe.models import build_model, default_dataset

    if config.dataset is None:
        config.dataset = default_dataset(config.model)
    data = load_dataset(config.dataset, data_dir=config.data_dir, samples=config.samples, seed=config.data_seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=data.num_classes, input_shape=tuple(data.input_shape),
                        **config.model_options)
    stages = parse_stages(config.stages)
    wanted = stages if isinstance(stages, int) else len(stages) if stages else 0
    if wanted > len(model):
        # deeper pipelines than the model has blocks: split the blocks into their layers
        model = split_blocks(model)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LayerpipeError("--device cuda was asked for but no CUDA device is available")
    return model.to(device), data, loss_fn(data.task)


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
) -> TrainResult:
    """Train as `config` says; write metrics (and plots) to `run_dir` when given.

    `save` receives the trained model's state_dict, written atomically at the end only, so
    a run that diverges never overwrites a good file. `checkpoint_every` N writes
    `run_dir/checkpoint.pt` every N epochs (atomically); `resume` continues from it and
    ends with the weights an uninterrupted run would have. `on_epoch(record)` is called
    after each epoch's record (and checkpoint).

    Under torchrun or `layerpipe train --nproc K` (WORLD_SIZE in the environment), or with
    `distributed` options (timeout, backend, ...), each process runs one stage:
    `layerpipe.engine.distributed.train_distributed`, same numbers, same result (it mirrors
    this loop: keep the two in step; tests/test_distributed.py compares them).
    """
    if distributed is not None or "WORLD_SIZE" in os.environ:
        from layerpipe.engine.distributed import train_distributed

        return train_distributed(config, run_dir=run_dir, progress=progress, save=save,
                                 checkpoint_every=checkpoint_every, resume=resume, on_epoch=on_epoch,
                                 **(distributed or {}))
    from layerpipe.engine.single import Pipeline
    from layerpipe.report.records import MetricsLog, atomic_torch_save

    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    model, data, loss = build(config)
    device = torch.device(config.device)
    pipe = Pipeline(
        model,
        stages=parse_stages(config.stages),
        weights=config.weights,
        optimizer=make_optimizer_factory(config),
        loss_fn=loss,
        schedule=config.schedule,
    )
    # what exact stashing would hold with this partition (also reported for sync and ema runs)
    stash_delays = stage_delays(pipe.num_stages, config.schedule)
    stash_bytes = sum(d * s.parameter_bytes() for d, s in zip(stash_delays, pipe.stages))
    result = TrainResult(config.to_dict(), pipe.stage_sizes, pipe.delays, stash_bytes=stash_bytes,
                         parameter_bytes=pipe.parameter_bytes())
    run_path = Path(run_dir) if run_dir else None
    first_epoch = 0
    checkpoint = run_path / "checkpoint.pt" if run_path else None
    if resume:
        if checkpoint is None or not checkpoint.exists():
            raise LayerpipeError(f"--resume: no checkpoint at {checkpoint}")
        state = _load_checkpoint(checkpoint, config)
        pipe.load_state_dict(state["pipeline"])
        first_epoch, result.history = int(state["epoch"]), list(state["history"])
        torch.set_rng_state(state["rng"])  # dropout masks continue as they would have
    metrics = None
    if run_path:
        metrics = MetricsLog(run_path / "metrics.jsonl", config.to_dict())
        for record in result.history:
            metrics.write(record)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    peak_history = pipe.weight_history_bytes()
    for epoch in range(first_epoch, config.epochs):
        epoch_start = time.perf_counter()
        set_lr([stage.optimizer for stage in pipe.stages], pipe.delays, epoch_lr(config, epoch), config.stage_lr)
        order = epoch_order(len(x_train), config.batch_size, config.seed, epoch)
        losses: list[Tensor] = []
        for _, info in _ticks(pipe, x_train, y_train, order, progress, f"epoch {epoch + 1}/{config.epochs}"):
            losses.extend(info.losses.values())
        peak_history = max(peak_history, pipe.weight_history_bytes())
        seconds = time.perf_counter() - epoch_start
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test, loss)
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        record = record_epoch(result, metrics, epoch, train_loss, test_loss, test_acc, seconds, peak_history)
        if checkpoint and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
            atomic_torch_save(
                {"config": config.to_dict(), "epoch": epoch + 1, "history": result.history,
                 "pipeline": pipe.state_dict(), "rng": torch.get_rng_state()},
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(record)
    result.test_loss, result.test_accuracy = evaluate(model, data.x_test, data.y_test, loss)
    result.weight_history_bytes = peak_history
    result.seconds = time.perf_counter() - start
    result.run_dir = str(run_path) if run_path else None
    if run_path:
        plot_learning_curve(config, result.history, run_path)
    if save:
        atomic_torch_save(model.state_dict(), save)
    return result


def record_epoch(result: TrainResult, metrics, epoch: int, train_loss: float, test_loss: float,
                 test_accuracy: float, seconds: float, weight_history_bytes: int) -> dict[str, Any]:
    """The per-epoch record (one JSON line), appended to the result and the metrics log;
    both engines write it through here."""
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


def _ticks(pipe, x: Tensor, y: Tensor, order: list[Tensor], progress: bool, desc: str) -> Iterator[tuple[int, Any]]:
    """Feed one epoch into the pipeline, then drain it; yields (microbatch, TickInfo)."""
    bar: Iterable[Tensor] = order
    if progress:  # tqdm only when shown: headless runs (benchmarks/gpu_check.py) need torch and numpy only
        from tqdm.auto import tqdm

        bar = tqdm(order, desc=desc, leave=False, unit="mb", dynamic_ncols=True)
    for i, idx in enumerate(bar):
        yield i, pipe.step(x[idx], y[idx])
    for info in pipe.flush():
        yield -1, info


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=config.device, weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise LayerpipeError(f"cannot read checkpoint {path}: {exc}") from None
    check_checkpoint_config(state, config, f"checkpoint {path}")
    return state


def check_checkpoint_config(state: dict[str, Any], config: TrainConfig, what: str) -> None:
    """Refuse to resume a run with settings that change what the saved state means (both engines)."""
    saved = dict(state.get("config", {}))
    for key in ("model", "model_options", "dataset", "stages", "weights", "schedule", "seed", "batch_size"):
        if saved.get(key) != getattr(config, key):
            raise LayerpipeError(f"{what} was made with {key}={saved.get(key)!r}, not {getattr(config, key)!r}")


def plot_learning_curve(config: TrainConfig, history: list[dict[str, Any]], run_path: Path) -> None:
    """run_path/learning_curve.png: test accuracy per epoch (both engines)."""
    from layerpipe.report.plots import learning_curves

    curve = [[r["test_accuracy"] for r in history]]
    learning_curves({f"{config.model} / {config.weights}": {config.weights: curve}}, run_path / "learning_curve.png")
