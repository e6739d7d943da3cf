"""What the training loop needs from an engine, and the two engines behind that interface.

    engine = LocalEngine(model, config, loss)                  # all stages in this process
    engine = DistributedEngine.start(config, world, ...)       # this process's stage
    losses = engine.run_epoch(x, y, order, on_microbatch)      # train one epoch, then drain
    stats = engine.epoch_stats(losses, engine.evaluate(x_test, y_test))   # on the main process

`Engine` is the whole interface: the loop (`training.loop.train`) never asks which engine it
drives. Per-process things (optimizers, state) are local; `epoch_stats`, `gather` and
`model_state` combine the processes' numbers on the main process (rank 0).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from layerpipe.engine.batch import take
from layerpipe.engine.distributed import Comm, EpochStats, StageFailure, StageWorker, World
from layerpipe.engine.distributed.topology import MeshLayout
from layerpipe.engine.single import Pipeline, cut_model, resolve_strategy
from layerpipe.errors import LayerpipeError, PlanError
from layerpipe.plan import parse_stages, sequential_spec, split_spec
from layerpipe.training.build import evaluate, evaluate_split, make_optimizer_factory
from layerpipe.training.config import TrainConfig

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What an engine offers the training loop."""

    rank: int
    world_size: int
    #: this process's stage, its replica (data parallelism), the replicas per stage R, and how
    #: many stage files a checkpoint has (1 for the local engine: its file holds every stage)
    stage_index: int
    replica: int
    dp: int
    stage_files: int
    #: whether this process runs the first stage (reads the inputs) / the last (the labels)
    reads_inputs: bool
    reads_labels: bool
    stage_sizes: list[int]
    delays: list[int]
    #: parameter bytes of every stage of the pipeline (all processes)
    stage_parameter_bytes: list[int]

    def optimizers(self) -> list[torch.optim.Optimizer | None]: ...
    def local_delays(self) -> list[int]: ...
    def run_epoch(self, x: Tensor, y: Tensor, order: Sequence[Tensor], on_microbatch: Callable[[], None] | None) -> list[Tensor]: ...
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float] | None: ...
    def history_bytes(self) -> int: ...
    def epoch_stats(self, losses: list[Tensor], test: tuple[float, float] | None) -> EpochStats | None: ...
    def gather(self, obj: Any) -> list[Any] | None: ...
    def share(self, name: str, value: str) -> str: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def model_state(self) -> dict[str, Tensor] | None: ...
    def close(self) -> None: ...
    def fail(self, exc: BaseException) -> BaseException: ...


@dataclass
class CustomModel:
    """A model and data of the user's instead of the zoo's (`layerpipe.train_pipeline`).

    `build(config)` returns (model, data, loss_fn) and is called in every process with the
    same seed, so every process holds the same model; `data` has x_train, y_train, x_test,
    y_test, the inputs a tensor, a tuple or a dict of keyword tensors with the samples along
    dim 0. A model that is not an nn.Sequential (or given `split_points`) is cut by
    `layerpipe.split` at `split_points` (or into `config.stages` stages), traced on
    `example_inputs` (default: the first `config.batch_size` training inputs)."""

    build: Callable[[TrainConfig], tuple[nn.Module, Any, Callable]]
    split_points: list[str] | None = None
    example_inputs: Any = None

    def split_options(self, model: nn.Module, data: Any, config: TrainConfig) -> dict[str, Any]:
        """The keywords of the engines' split path; {} for an nn.Sequential cut into slices."""
        if isinstance(model, nn.Sequential) and self.split_points is None:
            return {}
        example = self.example_inputs
        if example is None:
            example = take(data.x_train, slice(0, config.batch_size))
        return {"split_points": self.split_points, "example_inputs": example}


def _split_stages(config: TrainConfig, split_points: Sequence[str] | None) -> Any:
    return None if split_points is not None else parse_stages(config.stages)


class LocalEngine:
    """Every stage in this process: `engine.single.Pipeline`."""

    rank, world_size = 0, 1
    stage_index, replica, dp, stage_files = 0, 0, 1, 1
    reads_inputs = reads_labels = True  # every stage runs here

    def __init__(self, model: nn.Module, config: TrainConfig, loss_fn, *, split_points: Sequence[str] | None = None,
                 example_inputs: Any = None) -> None:
        self.model, self.loss_fn = model, loss_fn
        split = split_points is not None or example_inputs is not None

        def pipeline(compensation: list[str]) -> Pipeline:
            return Pipeline(model, stages=_split_stages(config, split_points) if split else parse_stages(config.stages),
                            weights=config.weights, optimizer=make_optimizer_factory(config), loss_fn=loss_fn,
                            schedule=config.schedule, weight_options=config.weight_options,
                            compensation=compensation, split_points=split_points, example_inputs=example_inputs,
                            fused_update=config.fused_update)

        self.pipe = pipeline(config.compensation)
        # the accumulation depends on the delays, known once built; building changes no
        # weight and draws no random number, so the rebuilt pipeline is the one a user would get
        compensation = config.run_compensation(max(self.pipe.delays))
        if compensation != config.compensation:
            self.pipe = pipeline(compensation)
        self.stage_sizes, self.delays = self.pipe.stage_sizes, self.pipe.delays
        self.stage_parameter_bytes = [s.parameter_bytes() for s in self.pipe.stages]

    def optimizers(self) -> list[torch.optim.Optimizer | None]:
        return self.pipe.optimizers

    def local_delays(self) -> list[int]:
        return self.delays

    def run_epoch(self, x: Tensor, y: Tensor, order: Sequence[Tensor], on_microbatch=None) -> list[Tensor]:
        losses: list[Tensor] = []
        for idx in order:
            losses.extend(self.pipe.step(take(x, idx), take(y, idx)).losses.values())
            if on_microbatch is not None:
                on_microbatch()
        for info in self.pipe.flush():
            losses.extend(info.losses.values())
        return losses

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        if self.pipe.split is not None:
            return evaluate_split(self.pipe.split, x, y, self.loss_fn)
        return evaluate(self.model, x, y, self.loss_fn)

    def history_bytes(self) -> int:
        return self.pipe.weight_history_bytes()

    def epoch_stats(self, losses: list[Tensor], test: tuple[float, float] | None) -> EpochStats:
        assert test is not None
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        return EpochStats(train_loss, test[0], test[1], self.history_bytes())

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def share(self, name: str, value: str) -> str:
        return value

    def state_dict(self) -> dict[str, Any]:
        return self.pipe.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipe.load_state_dict(state)

    def model_state(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def close(self) -> None:
        pass

    def fail(self, exc: BaseException) -> BaseException:
        return exc


def stage_device(device: str, world: World) -> torch.device:
    """cuda -> cuda:<local rank> (modulo the GPUs present); anything else as given."""
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise LayerpipeError("--device cuda was asked for but no CUDA device is available")
        if d.index is None:
            d = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return d


def check_stage_count(stages: int | list[int] | None, world_size: int, num_layers: int | None = None,
                      dp: int = 1) -> None:
    """The number of stages times the replicas per stage (`dp`) must equal the number of processes."""
    if dp < 1:
        raise PlanError(f"--dp must be at least 1, got {dp}")
    if world_size % dp:
        raise PlanError(f"the run has {world_size} processes, not a multiple of --dp {dp} (K stages x R replicas)")
    if isinstance(stages, int):
        count = stages
    elif stages is None:
        if num_layers is None:
            return
        count = num_layers
    else:
        count = len(stages)
    if count * dp != world_size:
        if dp > 1:
            raise PlanError(f"--stages gives {count} stages x --dp {dp} replicas = {count * dp} processes but the run "
                            f"has {world_size}; they must be equal")
        raise PlanError(f"--stages gives {count} stages but the run has {world_size} processes; they must be equal")


class DistributedEngine:
    """This process's stage of a run with one process per stage (times R replicas with data
    parallelism): `engine.distributed.StageWorker`."""

    def __init__(self, comm: Comm, worker: StageWorker) -> None:
        self.comm, self.worker = comm, worker
        self.rank, self.world_size = comm.rank, comm.world_size
        self.stage_index, self.replica, self.dp = comm.stage_index, comm.replica, comm.layout.dp
        self.stage_files = comm.layout.num_stages
        self.reads_inputs, self.reads_labels = comm.stage_index == 0, comm.stage_index == comm.layout.num_stages - 1
        if worker is not None:
            self.stage_sizes, self.delays = worker.stage_sizes, worker.delays
            self.stage_parameter_bytes = worker.stage_parameter_bytes

    @classmethod
    def start(cls, config: TrainConfig, model: nn.Module, data, loss_fn, world: World, device: torch.device,
              *, timeout: float = 60.0, backend: str = "auto", staging: bool | None = None,
              forced_exit: Callable[[str], None] | None = None, dp: int = 1, split_points: Sequence[str] | None = None,
              example_inputs: Any = None) -> DistributedEngine:
        """Join the run and keep this process's stage of `model` (built on the CPU). `dp`:
        replicas of every stage (R); the run then has K x R processes. A model given
        `split_points` or `example_inputs` is cut by `layerpipe.split` (see `Pipeline`)."""
        dp = int(dp)
        split = split_points is not None or example_inputs is not None
        if split:
            check_stage_count(len(split_points) + 1 if split_points is not None else parse_stages(config.stages),
                              world.world_size, None, dp)
        else:
            check_stage_count(parse_stages(config.stages), world.world_size, len(model), dp)
        try:
            comm = Comm(world, device=device, timeout=timeout, backend=backend, staging=staging,
                        forced_exit=forced_exit, dp=dp)
        except LayerpipeError:
            raise
        except Exception as exc:  # the store or the process group could not be set up in time
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            layout = MeshLayout(world.world_size, dp)
            stage, replica = layout.coords(world.rank)
            raise StageFailure(f"{layout.describe(world.rank)} could not join the run: {text}", stage, local=True,
                               replica=replica, rank=world.rank) from None
        try:
            strategy, schedule = resolve_strategy(config.weights, config.schedule)
            if split:  # every process cuts the same model on the same example inputs
                cut = cut_model(model, _split_stages(config, split_points), split_points, example_inputs)
                spec = split_spec(cut.split_points, schedule)
                worker = StageWorker(comm, model, spec, weights=strategy,
                                     optimizer=make_optimizer_factory(config), loss_fn=loss_fn, device=device,
                                     weight_options=config.weight_options,
                                     compensation=config.run_compensation(max(spec.delays), dp), split=cut,
                                     fused_update=config.fused_update)
            else:
                spec = sequential_spec(model, parse_stages(config.stages), schedule)
                worker = StageWorker(comm, model, spec, weights=strategy, optimizer=make_optimizer_factory(config),
                                     loss_fn=loss_fn, sample=data.x_train[:2], device=device,
                                     weight_options=config.weight_options,
                                     compensation=config.run_compensation(max(spec.delays), dp),
                                     fused_update=config.fused_update)
        except BaseException as exc:
            raise cls(comm, None).fail(exc) from None  # type: ignore[arg-type]
        return cls(comm, worker)

    def optimizers(self) -> list[torch.optim.Optimizer | None]:
        return [self.worker.stage.optimizer]

    def local_delays(self) -> list[int]:
        return [self.delays[self.stage_index]]

    def run_epoch(self, x: Tensor, y: Tensor, order: Sequence[Tensor], on_microbatch=None) -> list[Tensor]:
        return self.worker.run_epoch(x, y, order, on_forward=on_microbatch)

    def evaluate(self, x: Tensor, y: Tensor) -> tuple[float, float] | None:
        return self.worker.evaluate(x, y)

    def history_bytes(self) -> int:
        return self.worker.history_bytes()

    def epoch_stats(self, losses: list[Tensor], test: tuple[float, float] | None) -> EpochStats | None:
        return self.worker.epoch_stats(losses, test)

    def gather(self, obj: Any) -> list[Any] | None:
        return self.comm.gather_objects(obj)

    def share(self, name: str, value: str) -> str:
        return self.comm.share(name, value)

    def state_dict(self) -> dict[str, Any]:
        return self.worker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.worker.load_state_dict(state)

    def model_state(self) -> dict[str, Tensor] | None:
        """The whole model's state_dict on rank 0: replica 0 of every stage."""
        mine = {k: v.detach().cpu() for k, v in self.worker.model_state_dict().items()} if self.replica == 0 else {}
        states = self.comm.gather_objects(mine)
        if states is None:
            return None
        merged: dict[str, Tensor] = {}
        for s in states:
            merged.update(s)
        split = self.worker.split
        if split is not None:  # the model's own order (a tied alias such as lm_head.weight comes from its owner)
            order = [name for name in split.model.state_dict() if name in merged]
            known = set(order)
            merged = {name: merged[name] for name in order + [n for n in merged if n not in known]}
        return merged

    def close(self) -> None:
        self.comm.barrier()
        self.comm.close()

    def fail(self, exc: BaseException) -> BaseException:
        """Record `exc` as the run's failure and let go of the others; the exception to raise."""
        if isinstance(exc, KeyboardInterrupt):
            self.comm.monitor.record(f"{self.comm.monitor.name(self.rank)} was interrupted", self.rank, local=True)
            self.comm.abandon()
            return exc
        failure = self.comm.monitor.fail_local(exc)
        log.debug("rank %d failed", self.rank, exc_info=exc)
        self.comm.abandon()
        return failure
