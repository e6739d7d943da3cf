"""Messages between pipeline stages on torch.distributed, with timeouts and failure reports.

    world = World.from_env()                     # RANK, WORLD_SIZE, MASTER_ADDR, ... (torchrun)
    comm = Comm(world, device="cpu", timeout=60.0)
    h = comm.post_recv(src=0, shape=(32, 128), dtype=torch.float32, tag=ACT)  # before computing
    ...                                          # compute; the message arrives meanwhile
    x = comm.wait(h)                             # blocks; DistributedError names stage 0 on failure
    comm.send(dst=2, tensor=y, tag=ACT)          # returns at once; completion is awaited on a thread

What gloo does on loopback (measured, torch 2.13), and what this module makes of it:

- A send completes only once the receiver has posted the matching receive (rendezvous), so
  receivers post one tick ahead and senders never wait in the compute thread: one thread per
  process waits for send completions, in order, and keeps the tensors alive until then.
- A wait that times out closes the pair for good, so a timeout is final, never a poll; and
  `is_completed()` lags, so nothing polls: the compute thread blocks in `wait(timeout)`.
- A peer that dies closes its sockets and every pending wait on it fails at once
  ("Connection closed by peer"); a failing stage therefore records its error in the store
  and leaves at once, and the failure ripples down the pipeline within milliseconds.
- A peer that hangs is caught by the timeout. Each process's monitor thread publishes a
  heartbeat and what its compute thread waits for; the stage that times out follows that
  chain to the stage that is really stuck, so the report names it and not a neighbour.

The first failure is recorded under one store key (compare-and-set: the first writer wins)
and every process reports that same line. The store belongs to the launcher (`--nproc`) or
torchrun's agent, so it survives any stage; without either, rank 0 hosts it.

CUDA: NCCL serves processes that each own a GPU. Processes that share one GPU cannot
exchange CUDA tensors (NCCL refuses two ranks on one device, gloo crashes), so there gloo
carries the messages through CPU copies (`staging`): copy to the host, send, copy back.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from layerpipe.errors import DistributedError, LayerpipeError

log = logging.getLogger(__name__)

# message tags: each direction of a link carries one kind in training, and gloo matches a
# receive by (source, tag), so the tags only make the stream self-describing
ACT, GRAD, EVAL, STATS = 1, 2, 3, 4

#: seconds between heartbeats of the monitor thread
HEARTBEAT_S = 0.5
#: a stage whose heartbeat is older than this is taken as stopped
STALE_S = 5.0
#: seconds a process lets its compute thread notice a peer's failure before leaving by force
FORCED_EXIT_GRACE_S = 5.0


class StageFailure(DistributedError):
    """A stage of a distributed run failed. `stage` names the stage at fault (None: unknown);
    `local` is True in the process where the failure started."""

    def __init__(self, message: str, stage: int | None = None, local: bool = False) -> None:
        super().__init__(message)
        self.stage = stage
        self.local = local


@dataclass(frozen=True)
class World:
    """Where this process sits: rank, world size and how to reach the store."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    #: the store is hosted outside the ranks (the `--nproc` launcher or torchrun's agent)
    store_hosted: bool = False
    #: torchrun restart attempt; keys are namespaced by it
    restart: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World | None:
        """The world torchrun or the `--nproc` launcher describe; None outside them."""
        env = dict(os.environ) if env is None else env
        if "WORLD_SIZE" not in env:
            return None
        world_size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        port = env.get("MASTER_PORT")
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=int(env.get("LOCAL_RANK", str(rank))),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
            store_hosted=env.get("LAYERPIPE_STORE_HOSTED") == "1" or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )

    @property
    def prefix(self) -> str:
        return f"layerpipe/{self.restart}/"


def choose_backend(device: torch.device, requested: str, world: World) -> tuple[str, bool]:
    """(backend, staging). `auto`: NCCL when every local process owns a GPU, else gloo; gloo
    with CUDA tensors always goes through CPU copies."""
    if requested not in ("auto", "gloo", "nccl"):
        raise DistributedError(f"unknown backend {requested!r}; choose auto, gloo or nccl")
    cuda = device.type == "cuda"
    own_gpu = cuda and torch.cuda.is_available() and torch.cuda.device_count() >= world.local_world_size
    if requested == "nccl":
        if not cuda:
            raise DistributedError("--backend nccl needs --device cuda")
        if not own_gpu:
            raise DistributedError(
                f"--backend nccl needs one GPU per process: {world.local_world_size} processes on this node, "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPUs (use --backend gloo)"
            )
        return "nccl", False
    if requested == "auto" and own_gpu and world.world_size > 1:
        return "nccl", False
    return "gloo", cuda


@dataclass
class Pending:
    """A posted receive: its work handle, its buffer, and where it comes from."""

    work: Any
    buffer: Tensor
    src: int
    tag: int


def _timedelta(seconds: float) -> _dt.timedelta:
    return _dt.timedelta(seconds=float(seconds))


class Comm:
    """Point-to-point messages and control for one stage process (see the module docstring).

    Args:
        world: this process's place; `World()` (one process) needs no store address.
        device: where the stage computes; received tensors land there.
        timeout: seconds any wait may take (init, receives, sends, barriers, store).
        backend: `auto`, `gloo` or `nccl` (see `choose_backend`).
        staging: force CPU copies of messages (the CUDA-with-gloo path), e.g. to test it.
        forced_exit: called with the failure line when a peer failed and this process's
            compute thread did not stop within `FORCED_EXIT_GRACE_S`; None: never force.
    """

    def __init__(
        self,
        world: World,
        *,
        device: str | torch.device = "cpu",
        timeout: float = 60.0,
        backend: str = "auto",
        staging: bool | None = None,
        forced_exit: Callable[[str], None] | None = None,
    ) -> None:
        self.world = world
        self.rank, self.world_size = world.rank, world.world_size
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self._td = _timedelta(timeout)
        self.backend, auto_staging = choose_backend(self.device, backend, world)
        self.staging = auto_staging if staging is None else bool(staging)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._pin = self.staging and self.device.type == "cuda"
        self._server_store = None
        store = self._connect_store()
        self.ctl = dist.PrefixStore(world.prefix + "ctl", store)
        log.debug("rank %d: init_process_group(%s, world %d)", self.rank, self.backend, self.world_size)
        dist.init_process_group(
            self.backend,
            store=dist.PrefixStore(world.prefix + "pg", store),
            rank=self.rank,
            world_size=self.world_size,
            timeout=self._td,
        )
        self._closed = False
        self.failure: StageFailure | None = None  # set by the monitor or the send thread
        self._waiting: tuple[int, float] | None = None  # (peer, since) while blocked in a wait
        self._sends: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name=f"layerpipe-send-{self.rank}", daemon=True)
        self._sender.start()
        self._stop = threading.Event()
        self._forced_exit = forced_exit
        self._monitor_store = self._connect_store(client=True) if world.world_size > 1 else store
        self._monitor = threading.Thread(target=self._monitor_loop, name=f"layerpipe-monitor-{self.rank}", daemon=True)
        self._monitor.start()

    # -- set-up -------------------------------------------------------------------------------
    def _connect_store(self, client: bool = False):
        w = self.world
        if w.world_size == 1 and w.master_addr is None:
            if self._server_store is None:
                self._server_store = dist.HashStore()
            return self._server_store
        if w.master_addr is None or w.master_port is None:
            raise DistributedError("MASTER_ADDR and MASTER_PORT must be set for a distributed run")
        is_master = w.rank == 0 and not w.store_hosted and not client
        store = dist.TCPStore(
            w.master_addr, w.master_port, None if not is_master else w.world_size, is_master,
            timeout=self._td, wait_for_workers=False,
        )
        if is_master:
            self._server_store = store
        return store

    # -- messages -----------------------------------------------------------------------------
    def post_recv(self, src: int, shape: Sequence[int], dtype: torch.dtype, tag: int) -> Pending:
        """Post a receive now (before computing), collect it later with `wait`."""
        if self.staging:
            buf = torch.empty(tuple(shape), dtype=dtype, pin_memory=self._pin)
        else:
            buf = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        try:
            work = dist.irecv(buf, src=src, tag=tag)
        except Exception as exc:  # the pair is already closed
            raise self._peer_failed(src, exc) from None
        return Pending(work, buf, src, tag)

    def wait(self, pending: Pending) -> Tensor:
        """Block until a posted receive completes (at most `timeout` seconds)."""
        self.check()
        self._waiting = (pending.src, time.time())
        try:
            pending.work.wait(self._td)
        except Exception as exc:
            raise self._peer_failed(pending.src, exc) from None
        finally:
            self._waiting = None
        if self.staging:
            return pending.buffer.to(self.device, non_blocking=self._pin)
        return pending.buffer

    def recv(self, src: int, shape: Sequence[int], dtype: torch.dtype, tag: int) -> Tensor:
        return self.wait(self.post_recv(src, shape, dtype, tag))

    def send(self, dst: int, tensor: Tensor, tag: int) -> None:
        """Start sending `tensor`; returns at once. The tensor must not be changed afterwards."""
        self.check()
        t = tensor.detach()
        if self.staging:
            t = t.to("cpu", copy=True)  # a host-device sync on CUDA
        t = t.contiguous()
        try:
            work = dist.isend(t, dst=dst, tag=tag)
        except Exception as exc:
            raise self._peer_failed(dst, exc) from None
        self._sends.put((work, t, dst))

    def _send_loop(self) -> None:
        while True:
            item = self._sends.get()
            if item is None:
                return
            work, _tensor, dst = item
            try:
                work.wait(self._td)
            except Exception as exc:  # reported to the compute thread by check()
                if self.failure is None and not self._closed:
                    self.failure = self._describe_peer_failure(dst, exc)
            finally:
                self._sends.task_done()

    def flush_sends(self) -> None:
        """Wait until every send so far has completed (each within the timeout)."""
        self._sends.join()
        self.check()

    # -- collectives and control ----------------------------------------------------------------
    def barrier(self) -> None:
        self.flush_sends()
        if self.world_size == 1:
            return
        try:
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=self._td)  # names a rank that does not arrive
            else:
                dist.barrier()
        except Exception as exc:
            raise self._failed_collective("barrier", exc) from None

    def share(self, name: str, value: str | None) -> str:
        """Rank 0's `value` on every rank (through the store)."""
        key = f"share/{name}"
        if self.rank == 0:
            self.ctl.set(key, str(value))
            return str(value)
        try:
            return self.ctl.get(key).decode()
        except Exception as exc:
            raise self._failed_collective(f"reading {name!r} from rank 0", exc) from None

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        try:
            dist.gather_object(obj, out, dst=0)
        except Exception as exc:
            raise self._failed_collective("gathering the stages' states", exc) from None
        return out

    def check(self) -> None:
        """Raise the recorded failure of a peer or of a send, if any."""
        if self.failure is not None:
            raise self.failure

    # -- failures -------------------------------------------------------------------------------
    def record_failure(self, message: str, stage: int | None, local: bool) -> StageFailure:
        """Record `message` as the run's failure unless another was recorded first; return
        the failure this process should raise (the first one recorded)."""
        first = message
        try:
            first = self.ctl.compare_set("error", "", message).decode() or message
        except Exception:  # the store is gone too
            log.debug("rank %d could not record the failure in the store", self.rank)
        if first != message:
            return StageFailure(first, _stage_named(first), local=False)
        return StageFailure(message, stage, local=local)

    def fail_local(self, exc: BaseException) -> StageFailure:
        """This stage raised `exc`: record it as the run's failure."""
        if isinstance(exc, StageFailure):
            return exc
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, LayerpipeError):  # an unexpected error: name its type
            text = f"{type(exc).__name__}: {text}"
        failure = self.record_failure(f"stage {self.rank} failed: {text}", self.rank, local=True)
        self.failure = self.failure or failure
        return failure

    def _peer_failed(self, peer: int, exc: BaseException) -> StageFailure:
        failure = self.failure or self._describe_peer_failure(peer, exc)
        self.failure = failure
        return failure

    def _describe_peer_failure(self, peer: int, exc: BaseException) -> StageFailure:
        text = str(exc)
        recorded = self._recorded_error(wait=1.0)
        if recorded is not None:
            return StageFailure(recorded, _stage_named(recorded))
        if "timed out" in text.lower() or "timeout" in text.lower():
            message = self._blame(peer)
            stage = _stage_named(message)
        elif "closed" in text.lower() or "reset" in text.lower() or "broken pipe" in text.lower():
            stage = peer
            message = f"stage {peer} is gone: its connection closed (the process crashed or was killed)"
        else:
            stage = peer
            message = f"the link to stage {peer} failed: {text.splitlines()[0] if text else type(exc).__name__}"
        log.debug("rank %d: %s (%s)", self.rank, message, text)
        return self.record_failure(message, stage, local=False)

    def _failed_collective(self, what: str, exc: BaseException) -> StageFailure:
        recorded = self._recorded_error(wait=1.0)
        if recorded is not None:
            failure = StageFailure(recorded, _stage_named(recorded))
        else:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            stage = _rank_named(str(exc))
            failure = self.record_failure(
                f"{what} failed on stage {self.rank}: {text}" if stage is None else f"stage {stage} did not arrive at {what}",
                stage, local=False,
            )
        self.failure = self.failure or failure
        return failure

    def _recorded_error(self, wait: float = 0.0) -> str | None:
        deadline = time.monotonic() + wait
        while True:
            try:
                if self.ctl.check(["error"]):
                    return self.ctl.get("error").decode()
            except Exception:
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _blame(self, peer: int) -> str:
        """The failure line after waiting `timeout` on `peer`: follow "waits for" from `peer`
        to the stage that is really stuck, and name it."""
        seen = {self.rank}
        stage = peer
        while True:
            seen.add(stage)
            try:
                stamp, waiting_on, since = (float(v) for v in self.ctl.get(f"status/{stage}").decode().split())
            except Exception:
                return f"stage {stage} sent nothing for {self.timeout:g} s and has no status (see --timeout)"
            now = time.time()
            if now - stamp > STALE_S:
                return (f"stage {stage} is not responding: no heartbeat for {now - stamp:.0f} s "
                        f"(stopped or frozen; see --timeout)")
            nxt = int(waiting_on)
            if nxt < 0 or nxt in seen or now - since < self.timeout / 2:
                return f"stage {stage} sent nothing for {self.timeout:g} s: it is alive but stuck (see --timeout)"
            stage = nxt

    # -- the monitor thread -----------------------------------------------------------------------
    def _monitor_loop(self) -> None:
        store = dist.PrefixStore(self.world.prefix + "ctl", self._monitor_store)
        noticed: float | None = None
        store_down: float | None = None
        while not self._stop.wait(HEARTBEAT_S if store_down is None else 2 * HEARTBEAT_S):
            if self.failure is None or store_down is None:
                try:
                    waiting = self._waiting
                    src, since = waiting if waiting is not None else (-1, 0.0)
                    store.set(f"status/{self.rank}", f"{time.time():.3f} {src} {since:.3f}")
                    if self.failure is None and store.check(["error"]):
                        message = store.get("error").decode()
                        self.failure = StageFailure(message, _stage_named(message))
                    store_down = None
                except Exception as exc:  # the store's host is gone (or busy): retry, then give up
                    if self._stop.is_set():
                        return
                    store_down = store_down or time.monotonic()
                    if time.monotonic() - store_down > STALE_S and self.failure is None:
                        self.failure = StageFailure(
                            f"the run's store is unreachable (rank 0 or the launcher is gone): {str(exc).splitlines()[0]}", 0)
            if self.failure is not None and self._forced_exit is not None:
                noticed = noticed or time.monotonic()
                if time.monotonic() - noticed > FORCED_EXIT_GRACE_S:
                    log.error("rank %d: leaving by force: %s", self.rank, self.failure)
                    self._forced_exit(str(self.failure))
                    return

    # -- shutdown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """After a successful run: wait for the last sends, stop the threads, leave the group."""
        if self._closed:
            return
        self.flush_sends()
        self._closed = True
        self._sends.put(None)
        self._stop.set()
        self._sender.join(timeout=self.timeout)
        self._monitor.join(timeout=self.timeout)
        if dist.is_initialized():
            dist.destroy_process_group()

    def abandon(self) -> None:
        """After a failure: stop the threads without waiting on anything distributed. The
        process should exit soon (that closes its sockets and tells the peers)."""
        self._closed = True
        self._stop.set()


def _stage_named(message: str) -> int | None:
    """The stage a failure line names first ("stage 2 ..."), if any."""
    import re

    m = re.search(r"stage (\d+)", message)
    return int(m.group(1)) if m else None


def _rank_named(message: str) -> int | None:
    import re

    m = re.search(r"Rank (\d+) failed to pass", message) or re.search(r"rank (\d+)", message)
    return int(m.group(1)) if m else None
