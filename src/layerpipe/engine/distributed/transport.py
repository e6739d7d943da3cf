"""Messages between pipeline stages on torch.distributed: point-to-point with timeouts, and control.

    world = World.from_env()                     # RANK, WORLD_SIZE, MASTER_ADDR, ... (torchrun)
    comm = Comm(world, device="cpu", timeout=60.0)
    h = comm.post_recv(src=0, shape=(32, 128), dtype=torch.float32, tag=ACT)  # before computing
    ...                                          # compute; the message arrives meanwhile
    x = comm.wait(h)                             # blocks; StageFailure names the stage at fault
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

Data parallelism (`dp` R > 1): the K x R processes form a 2-D
`torch.distributed.device_mesh.DeviceMesh` with dims ("pp", "dp"), built right after
`init_process_group`; rank = stage * R + replica (see `MeshLayout`). Point-to-point messages
go between the same replica of neighbouring stages; `all_reduce_async` sums a flat gradient
bucket over the stage's "dp" group (`buckets`). `World`, `MeshLayout` and `choose_backend`
live in `topology` (re-exported here).

Failures are the business of `monitor.FailureMonitor` (one per process, `comm.monitor`). The
store belongs to the launcher (`--nproc`) or torchrun's agent, so it survives any stage;
without either, rank 0 hosts it.

CUDA: NCCL serves processes that each own a GPU. Processes that share one GPU cannot
exchange CUDA tensors (NCCL refuses two ranks on one device, gloo crashes), so there gloo
carries the messages through CPU copies (`staging`): copy to the host, send, copy back.
"""
from __future__ import annotations

import datetime as _dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from layerpipe.engine.distributed.monitor import FailureMonitor
from layerpipe.engine.distributed.topology import MeshLayout, World, choose_backend
from layerpipe.errors import DistributedError

log = logging.getLogger(__name__)

# message tags: each direction of a link carries one kind in training, and gloo matches a
# receive by (source, tag), so the tags only make the stream self-describing
ACT, GRAD, EVAL, STATS, TIED_GRAD, TIED_VALUE = 1, 2, 3, 4, 5, 6

__all__ = ["ACT", "EVAL", "GRAD", "STATS", "TIED_GRAD", "TIED_VALUE", "Comm", "MeshLayout", "Pending", "World",
           "choose_backend"]


@dataclass
class Pending:
    """A posted receive: its work handle, its buffer, and where it comes from."""

    work: Any
    buffer: Tensor
    src: int
    tag: int


class Comm:
    """Point-to-point messages and control for one stage process (see the module docstring).

    Args:
        world: this process's place; `World()` (one process) needs no store address.
        device: where the stage computes; received tensors land there.
        timeout: seconds any wait may take (init, receives, sends, barriers, store).
        backend: `auto`, `gloo` or `nccl` (see `choose_backend`).
        staging: force CPU copies of messages (the CUDA-with-gloo path), e.g. to test it.
        forced_exit: see `FailureMonitor`.
        dp: data-parallel replicas of every stage (R); the world size must be K x R.
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
        dp: int = 1,
    ) -> None:
        self.world = world
        self.layout = MeshLayout(world.world_size, dp)  # checked before any connection
        self.rank, self.world_size = world.rank, world.world_size
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self._td = _dt.timedelta(seconds=self.timeout)
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
        self._collectives = 0
        #: the (pp, dp) DeviceMesh when dp > 1; the stage's "dp" group
        self.mesh, self.dp_group = None, None
        if dp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (world.world_size // dp, dp), mesh_dim_names=("pp", "dp"))
            self.layout = MeshLayout(world.world_size, dp, self.mesh)
            self.dp_group = self.mesh.get_group("dp")
        self.stage_index, self.replica = self.layout.coords(self.rank)
        monitor_store = self._connect_store(client=True) if world.world_size > 1 else store
        self.monitor = FailureMonitor(self.rank, self.world_size, self.ctl,
                                      dist.PrefixStore(world.prefix + "ctl", monitor_store), self.timeout, forced_exit,
                                      layout=self.layout)
        self._sends: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name=f"layerpipe-send-{self.rank}", daemon=True)
        self._sender.start()

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

    def check(self) -> None:
        """Raise the run's failure if one is known here."""
        self.monitor.check()

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
            raise self.monitor.peer_failed(src, exc) from None
        return Pending(work, buf, src, tag)

    def wait(self, pending: Pending) -> Tensor:
        """Block until a posted receive completes (at most `timeout` seconds)."""
        self.check()
        self.monitor.waiting = (pending.src, time.time())
        try:
            pending.work.wait(self._td)
        except Exception as exc:
            raise self.monitor.peer_failed(pending.src, exc) from None
        finally:
            self.monitor.waiting = None
        if self.staging:
            return pending.buffer.to(self.device, non_blocking=self._pin)
        return pending.buffer

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
            raise self.monitor.peer_failed(dst, exc) from None
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
                if self.monitor.failure is None and not self._closed:
                    self.monitor.peer_failed(dst, exc)
            finally:
                self._sends.task_done()

    def flush_sends(self) -> None:
        """Wait until every send so far has completed (each within the timeout)."""
        self._sends.join()
        self.check()

    # -- data parallelism: the stage's gradient all-reduce ------------------------------------------
    def all_reduce_async(self, bucket: Tensor) -> Any:
        """Start summing `bucket` (in place) over this stage's replicas; returns the work
        handle for `wait_all_reduce`. Issued right after the backward, awaited just before
        the update, so it overlaps with sending the input gradient back."""
        self.check()
        t = bucket.cpu() if self.staging else bucket
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group, async_op=True)
        except Exception as exc:
            raise self.monitor.group_failed(self._dp_peers(), exc) from None
        return work, t, bucket

    def wait_all_reduce(self, handle: Any) -> Tensor:
        """The summed bucket (at most `timeout` seconds); a failure names the replica at fault."""
        work, t, bucket = handle
        self.check()
        peers = self._dp_peers()
        self.monitor.waiting = (peers[0], time.time())
        try:
            work.wait(self._td)
        except Exception as exc:
            raise self.monitor.group_failed(peers, exc) from None
        finally:
            self.monitor.waiting = None
        if t is not bucket:
            bucket.copy_(t)
        return bucket

    def _dp_peers(self) -> list[int]:
        return [r for r in self.layout.replicas(self.stage_index) if r != self.rank]

    # -- collectives and control ----------------------------------------------------------------
    def _collective(self, what: str, run: Callable[[], Any]) -> Any:
        """Run a collective; each rank marks its arrival in the store first, so a failure
        names the ranks that never came (as data, not from the error text)."""
        self._collectives += 1
        key = f"arrived/{self._collectives}/"
        self.ctl.set(key + str(self.rank), "1")
        try:
            return run()
        except Exception as exc:
            missing = []
            for r in range(self.world_size):
                try:
                    if not self.ctl.check([key + str(r)]):
                        missing.append(r)
                except Exception:
                    break
            raise self.monitor.collective_failed(what, missing, exc) from None

    def barrier(self) -> None:
        self.flush_sends()
        if self.world_size == 1:
            return
        if self.backend == "gloo":
            self._collective("barrier", lambda: dist.monitored_barrier(timeout=self._td))
        else:
            self._collective("barrier", dist.barrier)

    def share(self, name: str, value: str | None) -> str:
        """Rank 0's `value` on every rank (through the store)."""
        key = f"share/{name}"
        if self.rank == 0:
            self.ctl.set(key, str(value))
            return str(value)
        try:
            return self.ctl.get(key).decode()
        except Exception as exc:
            raise self.monitor.collective_failed(f"reading {name!r} from rank 0", [], exc) from None

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        self._collective("gathering the stages' states", lambda: dist.gather_object(obj, out, dst=0))
        return out

    # -- shutdown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """After a successful run: wait for the last sends, stop the threads, leave the group."""
        if self._closed:
            return
        self.flush_sends()
        self._closed = True
        self._sends.put(None)
        self.monitor.stop()
        self._sender.join(timeout=self.timeout)
        self.monitor.stop(join=self.timeout)
        if dist.is_initialized():
            dist.destroy_process_group()

    def abandon(self) -> None:
        """After a failure: stop the threads without waiting on anything distributed. The
        process should exit soon (that closes its sockets and tells the peers)."""
        self._closed = True
        self.monitor.stop()
