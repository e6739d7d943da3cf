"""One stage of the distributed runtime: its process runs the tick program of its stage.

    comm = Comm(World.from_env(), timeout=60)
    worker = StageWorker(comm, model, spec, weights="ema", optimizer=factory,
                         loss_fn=F.cross_entropy, sample=x_train[:2])
    losses = worker.run_epoch(x_train, y_train, order)   # then drain: nothing left in flight
    test = worker.evaluate(x_test, y_test)               # a pipelined forward of the test set

Process k runs stage k with `engine.stage.Stage` and the tick rule `schedule.Timing`, so
every weight strategy gives the numbers of the single-process engine. In local tick t of an
epoch, stage k

  1. posts the receive of the activation stage k-1 produces in tick t (it is needed in tick
     t+1: the forward register gives one tick of slack, so the transfer overlaps this tick),
  2. runs the forward of the microbatch due (its input arrived during tick t-1), sends the
     activation on, then posts the receive of the gradient stage k+1 produces in tick t,
  3. runs the backward due (LayerPipe: the gradient came during tick t-1, one tick of slack
     again; PipeDream 1F1B timing and `sync`: it comes within this tick) and sends the input
     gradient back, then applies the update.

Only receives block, each with a timeout; sends return at once. Per link the messages go in
the same order on both ends (activation of tick t, then gradient of tick t), which NCCL
needs; gloo matches them by tag. There is no barrier between ticks and no flush between
steps: the training loop drains once per epoch, as the single-process engine does. Stage 0
reads the inputs and the last stage the labels, each from the seeded epoch order; the
dataset is never sent. Every process builds the whole model from the same seed, derives the
partition and the per-sample activation shapes of every boundary from it (a forward of two
samples in eval mode), keeps its own stage and drops the rest.

Any model `layerpipe.split` can cut (`split=`): every process splits the same model with the
same example inputs, so all agree on the boundaries. A boundary then carries several tensors,
one message each, in the order of `split.boundaries[k]`; each has the shape of the boundary
spec with the batch dimension (where `batched`) set to the microbatch's size. Integer and
boolean values (token ids, masks) and values that need no gradient send none back. Stage 0
takes the user's inputs (a tensor, a tuple or a dict of keyword tensors, samples along dim 0)
and the last stage `loss_fn(model_output, target)`. A parameter read by stages in different
processes (tied embeddings) has one owner, its first reader; the others send it their
gradient parts and receive its new values (`tied`), with the numbers of one process.

Not the same numbers as one process: models that draw random numbers in the forward pass
(dropout): each process has its own random stream.

Data parallelism (`Comm(..., dp=R)`, R > 1): rank = stage * R + replica. Every replica of a
stage runs the same tick program on its slice of each global microbatch (`idx[j::R]`, as
DistributedSampler splits), talking only to the same replica of the neighbouring stages.
After each backward the stage's gradients are summed over its replicas (`buckets`: started
at once, awaited just before the update, so it overlaps with sending the input gradient
back). The updates are then identical on every replica, and so is the weight history (stash
versions, EMA buffers), with no further communication. BatchNorm running statistics stay per
replica (as DDP without SyncBatchNorm); replica 0's are the ones evaluated and saved.
Evaluation runs on replica 0's pipeline only.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from layerpipe.engine.batch import accuracy_counts, as_call, num_samples, take, to_device
from layerpipe.engine.distributed.boundaries import checked_split, message_shape, needs_grad, sequential_boundaries
from layerpipe.engine.distributed.buckets import finish_gradient_reduce, start_gradient_reduce
from layerpipe.engine.distributed.faults import FAULT_ENV, inject, parse_fault
from layerpipe.engine.distributed.tied import TiedLinks
from layerpipe.engine.distributed.transport import ACT, EVAL, GRAD, STATS, Comm, Pending
from layerpipe.engine.build import build_stages, sequential_modules
from layerpipe.engine.stage import LossFn, OptimizerFactory
from layerpipe.errors import LayerpipeError, PlanError
from layerpipe.plan import PipelineSpec
from layerpipe.schedule import Timing
from layerpipe.split.model import ValueSpec

if TYPE_CHECKING:
    from layerpipe.split import SplitModel

log = logging.getLogger(__name__)


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
        spec: the plan (`plan.sequential_spec`, or `plan.split_spec` with `split`); its stage
            count must equal the processes'.
        weights: the registered weight strategy (`sync` is a schedule: use `latest` with it).
        sample: a batch of at least two inputs (on the model's device), to find the
            activation shapes (an nn.Sequential cut into slices; not needed with `split`).
        split: the model cut by `layerpipe.split.split_model` with example inputs (so that
            it has `boundary_specs`), the same in every process; `model` is then `split.model`.
        device: where this stage computes; its layers move there (default: `comm.device`).
            Build the model on the CPU: only this stage's layers reach the device.
        fused_update: this stage's update as one compiled loop per tensor (see `Pipeline`).
    """

    def __init__(
        self,
        comm: Comm,
        model: nn.Module,
        spec: PipelineSpec,
        *,
        weights: str,
        optimizer: OptimizerFactory,
        loss_fn: LossFn,
        sample: Tensor | None = None,
        device: str | torch.device | None = None,
        weight_options: Mapping[str, Any] | None = None,
        compensation: Sequence[Any] | None = None,
        split: SplitModel | None = None,
        fused_update: bool = False,
    ) -> None:
        self.comm = comm
        layout = comm.layout
        #: stage index, replica index and the replicas per stage (R); `rank` is the stage index
        self.rank, self.replica, self.dp = comm.stage_index, comm.replica, layout.dp
        self.num_stages = layout.num_stages
        if spec.num_stages != self.num_stages:
            extra = f" x {self.dp} replicas" if self.dp > 1 else ""
            raise PlanError(
                f"the pipeline has {spec.num_stages} stages but the run has {self.num_stages} stages of processes"
                f"{extra}; they must be equal (one stage per process)"
            )
        self.spec = spec
        self.stage_sizes, self.delays = list(spec.stage_sizes), list(spec.delays)
        self.timing = Timing.of(spec)
        self.split = split
        #: the values crossing each boundary (one for an nn.Sequential); stages of a split model
        #: take and return tuples, slices of a Sequential one tensor
        self.boundaries: list[list[ValueSpec]]
        if split is None:
            if sample is None:
                raise PlanError("StageWorker needs sample= (a batch of inputs) to find the activation shapes")
            self.boundaries = sequential_boundaries(model, self.stage_sizes, sample)
            modules: list[nn.Module] = sequential_modules(model, spec)
        else:
            self.boundaries = checked_split(split, self.num_stages)
            modules = list(split.stages)
        self._tuples = split is not None
        self.stage_parameter_bytes = [
            sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad) for m in modules
        ]
        k = self.rank
        self.module = modules[k].to(device if device is not None else comm.device)  # shares the layers
        self.is_first, self.is_last = k == 0, k == self.num_stages - 1
        # the same replica of the neighbouring stages
        self.prev = layout.rank(k - 1, self.replica) if k > 0 else None
        self.next = layout.rank(k + 1, self.replica) if k < self.num_stages - 1 else None
        #: per microbatch of the last epoch: this replica's share n_j / N of the global microbatch
        self.loss_weights: list[float] = []
        (self.stage,) = build_stages(modules, spec, weights, optimizer, loss_fn, weight_options, only=k,
                                     compensation=compensation, fused_update=fused_update)
        #: tied parameters shared with other stages' processes (inactive when there are none)
        self.tied = TiedLinks(comm, self.stage, modules, spec, weights, weight_options, compensation)
        self.loss_fn = loss_fn
        self.tick = 0
        self.next_mb = 0
        self._fault = parse_fault(os.environ.get(FAULT_ENV), comm.rank)
        log.info("rank %d: stage %d of %s, delay %d, weights %s", k, k, self.stage_sizes, self.delays[k], weights)

    # -- one epoch ---------------------------------------------------------------------------------
    def run_epoch(
        self,
        x: Tensor,
        y: Tensor,
        order: Sequence[Tensor],
        on_forward: Callable[[], None] | None = None,
    ) -> list[Tensor]:
        """Train on the microbatches `x[idx], y[idx]` for idx in `order`, then drain. Stage 0
        needs `x`, the last stage `y`. Returns the last stage's losses (empty elsewhere).
        With R replicas, `order` holds the global microbatches; this replica takes `idx[j::R]`."""
        R, j_rep = self.dp, self.replica
        if R > 1:
            short = [len(idx) for idx in order if len(idx) < R]
            if short:
                raise LayerpipeError(f"a microbatch of {short[0]} sample(s) cannot be split over {R} replicas; "
                                     "change --batch-size or --samples")
            self.loss_weights = [len(idx[j_rep::R]) / len(idx) for idx in order]
            order = [idx[j_rep::R] for idx in order]
        else:
            self.loss_weights = [1.0] * len(order)
        return self._tick_program(x, y, order, on_forward)

    # -- evaluation: a pipelined forward of the test set ---------------------------------------------
    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple[float, float] | None:
        """`train.evaluate` of the whole model, pipelined: (mean loss, accuracy) on the last
        stage, None elsewhere. Same batches, same sums, same numbers. Stage 0 reads `x`, the
        last stage `y`; the others only their lengths. Replica 0's pipeline only."""
        comm, k, last = self.comm, self.rank, self.num_stages - 1
        if self.replica != 0:
            return None
        num = num_samples(y)
        starts = list(range(0, num, batch_size))
        ins = list(self.boundaries[k - 1]) if k > 0 else []
        was_training = self.module.training
        self.module.eval()
        device = comm.device
        total_loss, correct, count, scored = 0.0, 0, 0, True
        pending: list[Pending] | None = None
        try:
            for c, s in enumerate(starts):
                m = min(batch_size, num - s)
                if k > 0:
                    current = pending if pending is not None else self._post_values(self.prev, ins, m, EVAL)
                    pending = None
                    if c + 1 < len(starts):  # post the next receives before computing this one
                        pending = self._post_values(self.prev, ins, min(batch_size, num - starts[c + 1]), EVAL)
                    values = [comm.wait(p) for p in current]
                    out = self.module(*values)
                else:
                    args, kwargs = as_call(to_device(take(x, slice(s, s + m)), device))
                    out = self.module(*args, **kwargs)
                if k < last:
                    for v in (out if self._tuples else (out,)):
                        comm.send(self.next, v, EVAL)
                else:
                    yb = to_device(take(y, slice(s, s + m)), device)
                    total_loss += float(self.loss_fn(out, yb)) * m
                    counts = accuracy_counts(out, yb)
                    scored = scored and counts is not None
                    if counts is not None:
                        correct, count = correct + counts[0], count + counts[1]
        finally:
            self.module.train(was_training)
        if k < last:
            return None
        return total_loss / num, (correct / count if scored and count else float("nan"))

    # -- messages ---------------------------------------------------------------------------------------
    def _post_values(self, src: int, specs: Sequence[ValueSpec], batch: int, tag: int) -> list[Pending]:
        return [self.comm.post_recv(src, message_shape(s, batch), s.dtype, tag) for s in specs]

    def _tick_program(self, x: Any, y: Any, order: Sequence[Tensor],
                      on_forward: Callable[[], None] | None) -> list[Tensor]:
        """The tick program of this stage for one epoch: one message per value crossing a
        boundary (activations), one per value that needs a gradient (gradients). `order` is
        already this replica's share (see `run_epoch`)."""
        comm, stage, timing = self.comm, self.stage, self.timing
        k, last = self.rank, self.num_stages - 1
        n = len(order)
        sizes = [len(idx) for idx in order]
        base = self.next_mb
        tied = self.tied  # tied parameters shared with other processes (no-ops without any)
        tied.begin_epoch(n, base)
        acts: dict[int, list[Pending]] = {}  # producer tick -> posted receives
        grads: dict[int, list[Pending]] = {}
        losses: list[Tensor] = []
        ins: list[ValueSpec] = list(self.boundaries[k - 1]) if k > 0 else []
        outs: list[ValueSpec] = list(self.boundaries[k]) if k < last else []
        grad_ins = [i for i, s in enumerate(ins) if needs_grad(s)]  # inputs whose gradient we send back
        grad_outs = [i for i, s in enumerate(outs) if needs_grad(s)]  # outputs whose gradient we receive
        for t in range(timing.length(n)):
            if self._fault is not None and self.tick == self._fault[1]:
                inject(self._fault[0], k, self.tick)
            comm.check()
            # 1. the activations stage k-1 sends in this tick
            i = timing.forward(k - 1, t, n) if k > 0 else None
            if i is not None:
                acts[t] = self._post_values(self.prev, ins, sizes[i], ACT)
            tied.apply_values(t)  # the owners' updates of tick t-1, before the forward
            # 2. forward
            i = timing.forward(k, t, n)
            if i is not None:
                xb = take(x, order[i]) if k == 0 else self._unpack([comm.wait(p) for p in acts.pop(t - timing.forward_lag)])
                out = stage.forward(base + i, xb, take(y, order[i]) if k == last else None)
                if k == last:
                    losses.append(out)
                else:
                    for v in (out if self._tuples else (out,)):
                        comm.send(self.next, v, ACT)
            j = timing.backward(k + 1, t, n) if grad_outs else None
            if j is not None:
                grads[t] = self._post_values(self.next, [outs[i] for i in grad_outs], sizes[j], GRAD)
            tied.post_parts(t)
            # 3. backward and update
            j = timing.backward(k, t, n)
            if j is not None:
                self._backward(base + j, sizes[j], ins, outs, grad_ins, grad_outs,
                               grads.pop(t - timing.gradient_slack(k)) if grad_outs else [], self.loss_weights[j])
            tied.post_values(t)
            self.tick += 1
            if on_forward is not None and t < n:  # once per tick a microbatch entered, as `Pipeline.step`
                on_forward()
        self.next_mb += n
        tied.end_epoch(timing.length(n))
        if acts or grads or stage.inflight:  # a bug, not a user error
            raise RuntimeError(f"stage {k}: the epoch ended with messages or microbatches left over")
        return losses

    def _unpack(self, values: list[Tensor]) -> Any:
        return tuple(values) if self._tuples else values[0]

    def _backward(self, mb: int, size: int, ins: list[ValueSpec], outs: list[ValueSpec], grad_ins: list[int],
                  grad_outs: list[int], posted: list[Pending], loss_weight: float) -> None:
        """Backward of microbatch `mb`, the input gradients sent back (zeros where the input
        did not reach the output), the replicas' gradients summed, then the update."""
        comm = self.comm
        g: Any = None
        if grad_outs:
            full: list[Tensor | None] = [None] * len(outs)
            for i, p in zip(grad_outs, posted):
                full[i] = comm.wait(p)
            g = self._unpack(full)
        self.tied.take_parts(mb)
        g_in = self.stage.backward(mb, g)
        reduce = start_gradient_reduce(self.comm, self.stage.params, loss_weight) if self.dp > 1 else None
        g_ins = g_in if self._tuples else (g_in,)
        for i in grad_ins:
            v = g_ins[i] if g_in is not None else None
            if v is None:  # the input did not reach the output
                v = torch.zeros(message_shape(ins[i], size), dtype=ins[i].dtype, device=comm.device)
            comm.send(self.prev, v, GRAD)
        self.tied.send_parts(mb)
        if reduce is not None:
            finish_gradient_reduce(self.comm, reduce)
        self.stage.update()
        self.tied.send_values()

    def model_state_dict(self) -> dict[str, Tensor]:
        """This stage's part of the model's `state_dict`, under the model's own names (merge
        every stage's to get the whole model's)."""
        if self.split is None:
            return self.module.state_dict()
        users = {**self.split.param_users, **self.split.buffer_users}
        k = self.rank
        return {name: v for name, v in self.split.model.state_dict().items() if users.get(name, [0])[0] == k}

    def epoch_stats(self, losses: list[Tensor], test: tuple[float, float] | None) -> EpochStats | None:
        """Send this process's numbers to rank 0; rank 0 returns the whole pipeline's: the
        train loss over every replica of the last stage (each microbatch's losses weighted by
        the replicas' shares, so it is the mean loss of the global microbatches), the test
        numbers of replica 0's pipeline, the history bytes of one replica's pipeline."""
        comm, k, last = self.comm, self.rank, self.num_stages - 1
        mine = [float(self.history_bytes()) if self.replica == 0 else 0.0, float("nan"), float("nan"),
                float("nan")]
        if k == last:
            if losses and self.dp == 1:
                mine[1] = float(torch.stack(losses).mean())
            elif losses:
                w = torch.tensor(self.loss_weights[: len(losses)], dtype=torch.float64)
                mine[1] = float((torch.stack(losses).double().cpu() * w).sum() / len(losses))
            if test is not None:
                mine[2], mine[3] = test
        if comm.rank > 0:
            comm.send(0, torch.tensor(mine, dtype=torch.float64), STATS)
            return None
        rows = [mine]
        posted = [comm.post_recv(r, (4,), torch.float64, STATS) for r in range(1, comm.world_size)]
        rows += [comm.wait(p).cpu().tolist() for p in posted]
        lasts = self.comm.layout.replicas(last)
        test_row = rows[lasts[0]]
        return EpochStats(
            train_loss=sum(rows[r][1] for r in lasts) if self.dp > 1 else rows[lasts[0]][1],
            test_loss=test_row[2],
            test_accuracy=test_row[3],
            weight_history_bytes=int(sum(r[0] for r in rows)),
        )

    def history_bytes(self) -> int:
        """Bytes this process holds for past weights: its stage's, and its replicas of the
        strategies of tied parameters owned elsewhere."""
        return self.stage.history_bytes() + self.tied.history_bytes()

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This stage's state between epochs (nothing in flight)."""
        return {"tick": self.tick, "next_mb": self.next_mb, "stage": self.stage.state_dict(),
                "tied": self.tied.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tick, self.next_mb = int(state["tick"]), int(state["next_mb"])
        self.stage.load_state_dict(state["stage"])
        self.tied.load_state_dict(state.get("tied", []))
