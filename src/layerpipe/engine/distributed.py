"""The distributed runtime: one process per pipeline stage, asynchronous, no flush per step.

    # in every process of `layerpipe train --nproc K` or `torchrun --nproc-per-node K`
    comm = Comm(World.from_env(), timeout=60)
    worker = StageWorker(comm, model, stages=K, weights="ema", optimizer=factory,
                         loss_fn=F.cross_entropy, sample=x_train[:2])
    for epoch in range(epochs):
        worker.run_epoch(x_train, y_train, epoch_order(len(x_train), 32, seed, epoch))
        test = worker.evaluate(x_test, y_test)       # a pipelined forward of the test set
    comm.close()

Process k runs stage k with `engine.stage.Stage`, so every weight strategy gives the numbers
of the single-process engine (`engine.single.Pipeline`): the tick program of method.md
section 3 is executed per stage, each stage at its own pace. In local tick t of an epoch,
stage k

  1. posts the receive of the activation stage k-1 produces in tick t (it is needed in tick
     t+1: the forward register gives one tick of slack, so the transfer overlaps this tick),
  2. runs the forward of the microbatch due (its input arrived during tick t-1), sends the
     activation on, then posts the receive of the gradient stage k+1 produces in tick t,
  3. runs the backward due (LayerPipe: the gradient came during tick t-1, one tick of slack
     again; PipeDream 1F1B timing: it comes within this tick) and sends the input gradient
     back, then applies the update.

Only receives block, each with a timeout; sends return at once. Per link the messages go in
the same order on both ends (activation of tick t, then gradient of tick t), which NCCL
needs; gloo matches them by tag. There is no barrier between ticks and no flush between
steps: the training loop drains once per epoch, as the single-process engine does. Stage 0
reads the inputs and the last stage the labels, each from the seeded `epoch_order`; the
dataset is never sent. Every process builds the whole model from the same seed, derives the
partition and the per-sample activation shapes of every boundary from it (a forward of two
samples in eval mode), keeps its own stage and drops the rest.

`sync` runs synchronously across ranks (forward, backward and update of one microbatch
through all stages before the next enters), which is ordinary training, as in one process.

Not the same numbers as one process: models that draw random numbers in the forward pass
(dropout): each process has its own random stream.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from layerpipe.engine.dist_comm import ACT, GRAD, EVAL, STATS, Comm, Pending, StageFailure, World
from layerpipe.engine.single import plan_stages
from layerpipe.engine.stage import LossFn, Stage
from layerpipe.errors import LayerpipeError, PlanError
from layerpipe.weights import make_strategy

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

#: environment variable of the fault-injection hook used by the tests: "RANK:MODE:TICK",
#: MODE one of exit (os._exit(3)), raise (RuntimeError), hang (sleep in the compute thread)
FAULT_ENV = "LAYERPIPE_FAULT"


# -- the plan every process derives on its own --------------------------------------------------
def plan_pipeline(model: nn.Sequential, stages: int | Sequence[int] | None, weights: str, schedule: str) -> tuple[list[int], list[int]]:
    """(layers per stage, delay per stage), exactly as `engine.single.Pipeline` derives them."""
    return plan_stages(model, stages, weights, schedule)


@torch.no_grad()
def boundary_specs(model: nn.Sequential, sizes: Sequence[int], sample: Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Per-sample shape and dtype at every stage boundary: entry k is stage k's input, entry
    K the model's output. One forward of `sample` (two samples or more) in eval mode, so no
    running statistics change."""
    if sample.dim() == 0 or sample.shape[0] < 2:
        raise PlanError("the shape probe needs a sample batch of at least two inputs")
    batch = sample.shape[0]
    was_training = model.training
    model.eval()
    try:
        h = sample
        specs = [(tuple(h.shape[1:]), h.dtype)]
        start = 0
        for k, n in enumerate(sizes):
            h = model[start : start + n](h)
            start += n
            if not isinstance(h, Tensor) or h.dim() == 0 or h.shape[0] != batch:
                raise PlanError(
                    f"stage {k} must return one tensor with the batch as its first dimension "
                    f"(got {type(h).__name__} {tuple(getattr(h, 'shape', ()))} for a batch of {batch})"
                )
            specs.append((tuple(h.shape[1:]), h.dtype))
    finally:
        model.train(was_training)
    return specs


@dataclass(frozen=True)
class Timing:
    """When stage k works in local tick t of an epoch of n microbatches (method.md section 3)."""

    delays: tuple[int, ...]
    synchronous: bool

    def forward(self, k: int, t: int, n: int) -> int | None:
        """Microbatch (0-based in the epoch) whose forward stage k runs in tick t."""
        i = t if self.synchronous else t - k
        return i if 0 <= i < n else None

    def backward(self, k: int, t: int, n: int) -> int | None:
        i = t if self.synchronous else t - k - self.delays[k]
        return i if 0 <= i < n else None

    def length(self, n: int) -> int:
        """Ticks from the first microbatch entering to the last gradient applied."""
        if self.synchronous or n == 0:
            return n
        return n + max(k + d for k, d in enumerate(self.delays))

    @property
    def forward_lag(self) -> int:
        """Ticks between a stage's forward and the next stage's forward of the same microbatch."""
        return 0 if self.synchronous else 1

    def gradient_slack(self, k: int) -> int:
        """Ticks from stage k+1's backward of a microbatch to stage k's: 1 for LayerPipe (the
        gradient register), 0 for PipeDream's 1F1B timing (passed on within the tick)."""
        return 0 if self.synchronous else self.delays[k] - self.delays[k + 1] - 1


@dataclass
class EpochStats:
    """What rank 0 learns at the end of an epoch."""

    train_loss: float
    test_loss: float
    test_accuracy: float
    weight_history_bytes: int


class StageWorker:
    """Stage `comm.rank` of a pipeline of `comm.world_size` stages (see the module docstring).

    Args:
        comm: the connection to the other stages.
        model: the whole model, built identically in every process; this stage keeps its
            layers (they are trained in place), the caller may drop the rest.
        stages: as for `Pipeline`: K, layers per stage, or None (one layer per stage); the
            number of stages must equal the number of processes.
        sample: a batch of at least two inputs (on the model's device), to find the
            activation shapes.
        device: where this stage computes; its layers move there (default: `comm.device`).
            Build the model on the CPU: only this stage's layers reach the device.
    """

    def __init__(
        self,
        comm: Comm,
        model: nn.Sequential,
        *,
        stages: int | Sequence[int] | None,
        weights: str,
        optimizer: OptimizerFactory,
        loss_fn: LossFn,
        sample: Tensor,
        schedule: str = "layerpipe",
        device: str | torch.device | None = None,
    ) -> None:
        self.comm = comm
        self.rank, self.num_stages = comm.rank, comm.world_size
        self.stage_sizes, self.delays = plan_pipeline(model, stages, weights, schedule)
        if len(self.stage_sizes) != self.num_stages:
            raise PlanError(
                f"the pipeline has {len(self.stage_sizes)} stages but the run has {self.num_stages} processes; "
                "they must be equal (one stage per process)"
            )
        self.weights, self.schedule = weights, schedule
        self.timing = Timing(tuple(self.delays), weights == "sync")
        self.specs = boundary_specs(model, self.stage_sizes, sample)
        bounds, start = [], 0
        for n in self.stage_sizes:
            bounds.append((start, start + n))
            start += n
        self.stage_parameter_bytes = [
            sum(p.numel() * p.element_size() for p in model[a:b].parameters() if p.requires_grad) for a, b in bounds
        ]
        a, b = bounds[self.rank]
        self.module = model[a:b].to(device if device is not None else comm.device)  # shares the layers
        k = self.rank
        self.is_first, self.is_last = k == 0, k == self.num_stages - 1
        self.stage = Stage(
            k,
            self.module,
            self.delays[k],
            lambda ps, d, opt: make_strategy(weights, ps, d, opt),
            optimizer,
            is_last=self.is_last,
            loss_fn=loss_fn,
        )
        self.loss_fn = loss_fn
        self.tick = 0
        self.next_mb = 0
        self._fault = _parse_fault(os.environ.get(FAULT_ENV), k)
        log.info("rank %d: stage %d of %s, delay %d, weights %s", k, k, self.stage_sizes, self.delays[k], weights)

    # -- shapes of messages ----------------------------------------------------------------------
    def _input_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        return self.specs[self.rank]

    def _output_spec(self) -> tuple[tuple[int, ...], torch.dtype]:
        return self.specs[self.rank + 1]

    def _grad_into(self, k: int) -> bool:
        """Gradients cross the boundary into stage k (its input is floating point)."""
        return self.specs[k][1].is_floating_point

    # -- one epoch ---------------------------------------------------------------------------------
    def run_epoch(
        self,
        x: Tensor,
        y: Tensor,
        order: Sequence[Tensor],
        on_forward: Callable[[], None] | None = None,
    ) -> list[Tensor]:
        """Train on the microbatches `x[idx], y[idx]` for idx in `order`, then drain. Stage 0
        needs `x`, the last stage `y`. Returns the last stage's losses (empty elsewhere)."""
        comm, stage, timing = self.comm, self.stage, self.timing
        k, last = self.rank, self.num_stages - 1
        n = len(order)
        sizes = [len(idx) for idx in order]
        base = self.next_mb
        acts: dict[int, Pending] = {}  # producer tick -> posted receive
        grads: dict[int, Pending] = {}
        losses: list[Tensor] = []
        in_shape, in_dtype = self._input_spec()
        out_shape, out_dtype = self._output_spec()
        grad_in = k > 0 and self._grad_into(k)  # do we send gradients back?
        grad_out = k < last and self._grad_into(k + 1)  # do we receive gradients?
        for t in range(timing.length(n)):
            if self._fault is not None and self.tick == self._fault[1]:
                _inject(self._fault[0], k, self.tick)
            comm.check()
            # 1. the activation stage k-1 sends in this tick
            if k > 0:
                i = timing.forward(k - 1, t, n)
                if i is not None:
                    acts[t] = comm.post_recv(k - 1, (sizes[i], *in_shape), in_dtype, ACT)
            # 2. forward
            i = timing.forward(k, t, n)
            if i is not None:
                xb = x[order[i]] if k == 0 else comm.wait(acts.pop(t - timing.forward_lag))
                out = stage.forward(base + i, xb, y[order[i]] if k == last else None)
                if k == last:
                    losses.append(out)
                else:
                    comm.send(k + 1, out, ACT)
                if on_forward is not None:
                    on_forward()
            if grad_out:
                j = timing.backward(k + 1, t, n)
                if j is not None:
                    grads[t] = comm.post_recv(k + 1, (sizes[j], *out_shape), out_dtype, GRAD)
            # 3. backward and update
            j = timing.backward(k, t, n)
            if j is not None:
                g = comm.wait(grads.pop(t - timing.gradient_slack(k))) if grad_out else None
                g_in = stage.backward(base + j, g)
                if grad_in:
                    if g_in is None:  # the input did not reach the output
                        g_in = torch.zeros((sizes[j], *in_shape), dtype=in_dtype, device=comm.device)
                    comm.send(k - 1, g_in, GRAD)
                stage.update()
            self.tick += 1
        self.next_mb += n
        if acts or grads or stage.inflight:  # a bug, not a user error
            raise RuntimeError(f"stage {k}: the epoch ended with messages or microbatches left over")
        return losses

    # -- evaluation: a pipelined forward of the test set ---------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple[float, float] | None:
        """`train.evaluate` of the whole model, pipelined: (mean loss, accuracy) on the last
        stage, None elsewhere. Same batches, same sums, same numbers. Stage 0 reads `x`, the
        last stage `y`; the others only their lengths."""
        comm, k, last = self.comm, self.rank, self.num_stages - 1
        num = len(x)
        starts = list(range(0, num, batch_size))
        in_shape, in_dtype = self._input_spec()
        was_training = self.module.training
        self.module.eval()
        device = comm.device
        total_loss, correct, count = 0.0, 0, 0
        pending: Pending | None = None
        try:
            for c, s in enumerate(starts):
                m = min(batch_size, num - s)
                if k > 0:
                    if pending is None:
                        pending = comm.post_recv(k - 1, (m, *in_shape), in_dtype, EVAL)
                    current = pending
                    pending = None
                    if c + 1 < len(starts):  # post the next receive before computing this one
                        m2 = min(batch_size, num - starts[c + 1])
                        pending = comm.post_recv(k - 1, (m2, *in_shape), in_dtype, EVAL)
                    h = comm.wait(current)
                else:
                    h = x[s : s + m].to(device)
                out = self.module(h)
                if k < last:
                    comm.send(k + 1, out, EVAL)
                else:
                    yb = y[s : s + m].to(device)
                    total_loss += float(self.loss_fn(out, yb)) * m
                    correct += int((out.argmax(-1) == yb).sum())
                    count += yb.numel()
        finally:
            self.module.train(was_training)
        if k < last:
            return None
        return total_loss / num, correct / count

    def epoch_stats(self, losses: list[Tensor], test: tuple[float, float] | None) -> EpochStats | None:
        """Send this stage's numbers to rank 0; rank 0 returns the whole pipeline's."""
        comm, k, last = self.comm, self.rank, self.num_stages - 1
        mine = [float(self.stage.strategy.history_bytes()), float("nan"), float("nan"), float("nan")]
        if k == last:
            mine[1] = float(torch.stack(losses).mean()) if losses else float("nan")
            mine[2], mine[3] = test
        if k > 0:
            comm.send(0, torch.tensor(mine, dtype=torch.float64), STATS)
            return None
        rows = [mine]
        posted = [comm.post_recv(r, (4,), torch.float64, STATS) for r in range(1, self.num_stages)]
        rows += [comm.wait(p).cpu().tolist() for p in posted]
        return EpochStats(
            train_loss=rows[-1][1],
            test_loss=rows[-1][2],
            test_accuracy=rows[-1][3],
            weight_history_bytes=int(sum(r[0] for r in rows)),
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This stage's state between epochs (nothing in flight)."""
        return {"tick": self.tick, "next_mb": self.next_mb, "stage": self.stage.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tick, self.next_mb = int(state["tick"]), int(state["next_mb"])
        self.stage.load_state_dict(state["stage"])


# -- fault injection (tests) ------------------------------------------------------------------------
def _parse_fault(spec: str | None, rank: int) -> tuple[str, int] | None:
    if not spec:
        return None
    try:
        r, mode, tick = spec.split(":")
        if int(r) != rank:
            return None
        if mode not in ("exit", "raise", "hang"):
            raise ValueError(mode)
        return mode, int(tick)
    except ValueError:
        raise LayerpipeError(f"{FAULT_ENV} must look like RANK:exit|raise|hang:TICK, got {spec!r}") from None


def _inject(mode: str, rank: int, tick: int) -> None:
    log.warning("rank %d: injected fault %r at tick %d", rank, mode, tick)
    if mode == "exit":
        logging.shutdown()
        os._exit(3)
    if mode == "raise":
        raise RuntimeError(f"injected fault at tick {tick}")
    time.sleep(10**6)  # hang


# -- checkpoints on disk -------------------------------------------------------------------------------
#: the commit record of a distributed checkpoint: written by rank 0 once every stage's file is
#: on disk, so a crash in between leaves the previous checkpoint in force
MARKER = "checkpoint-stages.json"


def checkpoint_path(run_dir: Path, rank: int, epoch: int) -> Path:
    return run_dir / f"checkpoint-stage{rank}-epoch{epoch}.pt"


def save_checkpoint(comm: Comm, run_dir: Path, epoch: int, state: dict[str, Any]) -> None:
    """Every stage writes its file atomically; after a barrier rank 0 commits the marker.
    Each stage keeps its files of the last two checkpoints."""
    from layerpipe.report.records import atomic_torch_save, atomic_write_bytes

    previous = committed_epoch(run_dir)
    atomic_torch_save(state, checkpoint_path(run_dir, comm.rank, epoch))
    comm.barrier()
    if comm.rank == 0:
        marker = {"epoch": epoch, "world_size": comm.world_size,
                  "files": [checkpoint_path(run_dir, r, epoch).name for r in range(comm.world_size)]}
        atomic_write_bytes(run_dir / MARKER, json.dumps(marker).encode())
    if previous is not None:  # the committed checkpoint before this one stays; older ones go
        for old in run_dir.glob(f"checkpoint-stage{comm.rank}-epoch*.pt"):
            e = old.stem.rsplit("epoch", 1)[1]
            if e.isdigit() and int(e) < previous:
                old.unlink(missing_ok=True)


def committed_epoch(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / MARKER).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return None


def load_checkpoint(run_dir: Path, rank: int, world_size: int) -> dict[str, Any]:
    marker_path = run_dir / MARKER
    if not marker_path.exists():
        raise LayerpipeError(f"--resume: no distributed checkpoint in {run_dir} (no {MARKER})")
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as exc:
        raise LayerpipeError(f"cannot read {marker_path}: {exc}") from None
    if int(marker["world_size"]) != world_size:
        raise LayerpipeError(f"the checkpoint in {run_dir} has {marker['world_size']} stages, this run {world_size} processes")
    path = run_dir / marker["files"][rank]
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LayerpipeError(f"cannot read checkpoint {path}: {exc}") from None


# -- the training loop ------------------------------------------------------------------------------
def stage_device(device: str, world: World) -> torch.device:
    """cuda -> cuda:<local rank> (modulo the GPUs present); anything else as given."""
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise LayerpipeError("--device cuda was asked for but no CUDA device is available")
        if d.index is None:
            d = torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return d


def check_stage_count(stages: int | list[int] | None, world_size: int, num_layers: int | None = None) -> None:
    """The number of stages must equal the number of processes."""
    if isinstance(stages, int):
        count = stages
    elif stages is None:
        if num_layers is None:
            return
        count = num_layers
    else:
        count = len(stages)
    if count != world_size:
        raise PlanError(f"--stages gives {count} stages but the run has {world_size} processes; they must be equal")


def train_distributed(
    config,
    *,
    run_dir: str | Path | None = None,
    progress: bool = True,
    save: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    timeout: float = 60.0,
    backend: str = "auto",
    staging: bool | None = None,
    world: World | None = None,
    builder: Callable | None = None,
    forced_exit: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
):
    """`layerpipe.train.train` with one stage per process; returns the same `TrainResult`
    (complete on rank 0). Raises `StageFailure` (a `DistributedError`) naming the stage at
    fault when any stage fails; the caller should then leave the process promptly."""
    import dataclasses

    from layerpipe.report.records import MetricsLog, atomic_torch_save
    from layerpipe.plan import stage_delays
    from layerpipe.train import (
        TrainResult, build, check_checkpoint_config, epoch_lr, epoch_order, make_optimizer_factory, parse_stages,
        plot_learning_curve, record_epoch, set_lr,
    )

    world = world or World.from_env() or World()
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = stage_device(config.device, world)
    stages = parse_stages(config.stages)
    check_stage_count(stages, world.world_size)
    # the whole model is built on the CPU in every process; only this stage's layers move to
    # the device (a GPU never holds the whole model)
    local_config = dataclasses.replace(config, device="cpu")
    model, data, loss = (builder or build)(local_config)
    config.dataset = local_config.dataset  # build() fills in the default dataset
    check_stage_count(stages, world.world_size, len(model))
    try:
        comm = Comm(world, device=device, timeout=timeout, backend=backend, staging=staging, forced_exit=forced_exit)
    except LayerpipeError:
        raise
    except Exception as exc:  # the store or the process group could not be set up in time
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StageFailure(f"stage {world.rank} could not join the run: {text}", world.rank, local=True) from None
    try:
        worker = StageWorker(comm, model, stages=stages, weights=config.weights, optimizer=make_optimizer_factory(config),
                             loss_fn=loss, sample=data.x_train[:2], schedule=config.schedule, device=device)
        # stage 0 reads the inputs and the last stage the labels, from the same seeded order
        x_train = data.x_train.to(device) if comm.rank == 0 else data.x_train
        y_train = data.y_train.to(device) if comm.rank == comm.world_size - 1 else data.y_train
        del model  # this process keeps its stage's layers only
        rank, last = comm.rank, comm.world_size - 1
        # what exact stashing would hold with this partition (also reported for sync and ema runs)
        stash_delays = stage_delays(comm.world_size, config.schedule)
        stash_bytes = sum(d * b for d, b in zip(stash_delays, worker.stage_parameter_bytes))
        result = TrainResult(config.to_dict(), worker.stage_sizes, worker.delays, stash_bytes=stash_bytes,
                             parameter_bytes=sum(worker.stage_parameter_bytes))
        shared = comm.share("run_dir", str(run_dir) if run_dir else "")  # rank 0's folder everywhere
        run_path = Path(shared) if shared else None
        first_epoch = 0
        if resume:
            if run_path is None:
                raise LayerpipeError("--resume needs a run folder")
            state = load_checkpoint(run_path, rank, world.world_size)
            check_checkpoint_config(state, config, "the checkpoint")
            worker.load_state_dict(state["worker"])
            first_epoch, result.history = int(state["epoch"]), list(state.get("history", []))
            torch.set_rng_state(state["rng"])
        # the plan must agree everywhere, and rank 0 needs the starting history bytes
        plans = comm.gather_objects((worker.stage_sizes, worker.delays, config.weights, config.schedule,
                                     worker.stage.strategy.history_bytes(), first_epoch))
        peak_history = 0
        if rank == 0:
            assert plans is not None
            if len({repr(p[:4]) + str(p[5]) for p in plans}) != 1:
                raise LayerpipeError(f"the processes disagree on the plan or the checkpoint: {plans}")
            peak_history = sum(int(p[4]) for p in plans)
        metrics = None
        if run_path and rank == 0:
            metrics = MetricsLog(run_path / "metrics.jsonl", config.to_dict())
            for record in result.history:
                metrics.write(record)
        stats, trained = None, False
        for epoch in range(first_epoch, config.epochs):
            trained = True
            epoch_start = time.perf_counter()
            set_lr([worker.stage.optimizer], [worker.delays[rank]], epoch_lr(config, epoch), config.stage_lr)
            order = epoch_order(len(data.x_train), config.batch_size, config.seed, epoch)
            bar = _progress_bar(len(order), f"epoch {epoch + 1}/{config.epochs}", progress and rank == 0)
            try:
                losses = worker.run_epoch(x_train, y_train, order, on_forward=bar.update if bar else None)
            finally:
                if bar:
                    bar.close()
            seconds = time.perf_counter() - epoch_start
            test = worker.evaluate(data.x_test, data.y_test)
            stats = worker.epoch_stats(losses, test)
            if rank == 0:
                peak_history = max(peak_history, stats.weight_history_bytes)
                record_epoch(result, metrics, epoch, stats.train_loss, stats.test_loss, stats.test_accuracy,
                             seconds, peak_history)
            if run_path and checkpoint_every and (epoch + 1) % checkpoint_every == 0:
                save_checkpoint(comm, run_path, epoch + 1, {
                    "format": "layerpipe-distributed-stage/1", "config": config.to_dict(), "epoch": epoch + 1,
                    "world_size": world.world_size, "rank": rank, "worker": worker.state_dict(),
                    "rng": torch.get_rng_state(), "history": result.history if rank == 0 else [],
                })
            if on_epoch is not None and rank == 0:
                on_epoch(result.history[-1])
        if not trained:  # nothing left to train (resumed at the end): evaluate anyway
            test = worker.evaluate(data.x_test, data.y_test)
            stats = worker.epoch_stats([], test)
        if rank == 0:
            result.test_loss, result.test_accuracy = stats.test_loss, stats.test_accuracy
            result.weight_history_bytes = peak_history
        if save:
            states = comm.gather_objects({k: v.detach().cpu() for k, v in worker.module.state_dict().items()})
            if rank == 0:
                merged: dict[str, Tensor] = {}
                for s in states:
                    merged.update(s)
                atomic_torch_save(merged, save)
        comm.barrier()
    except KeyboardInterrupt:
        comm.record_failure(f"stage {comm.rank} was interrupted", comm.rank, local=True)
        comm.abandon()
        raise
    except BaseException as exc:
        failure = comm.fail_local(exc)
        log.debug("rank %d failed", comm.rank, exc_info=True)
        comm.abandon()
        raise failure from (None if isinstance(exc, StageFailure) else exc)
    comm.close()
    result.seconds = time.perf_counter() - start
    result.run_dir = str(run_path) if run_path else None
    if run_path and rank == 0:
        plot_learning_curve(config, result.history, run_path)
    return result


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="mb", dynamic_ncols=True)
