"""Failure monitoring for one stage process: the run's first failure, heartbeats, and blame.

The first failure of a run is recorded under one store key as data, `{"stage": 2,
"message": "..."}` (compare-and-set: the first writer wins), and every process reports that
same line. A monitor thread publishes this process's heartbeat and what its compute thread
waits for (`status/<rank>`); a stage that times out follows that "waits for" chain to the
stage that is really stuck, so the report names it and not a neighbour. When a peer has
failed and this process's compute thread does not notice within `FORCED_EXIT_GRACE_S`, the
monitor leaves by force (`forced_exit`).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from layerpipe.errors import DistributedError, LayerpipeError

log = logging.getLogger(__name__)

#: seconds between heartbeats of the monitor thread
HEARTBEAT_S = 0.5
#: a stage whose heartbeat is older than this is taken as stopped
STALE_S = 5.0
#: seconds a process lets its compute thread notice a peer's failure before leaving by force
FORCED_EXIT_GRACE_S = 5.0


class StageFailure(DistributedError):
    """A stage of a distributed run failed. `stage` names the stage at fault (None: unknown);
    `local` is True in the process where the failure started."""

    def __init__(self, message: str, stage: int | None = None, local: bool = False,
                 replica: int | None = None, rank: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.local = local
        #: with data parallelism: the replica of `stage` at fault, and its global rank
        self.replica, self.rank = replica, rank


def _encode(message: str, stage: int | None, replica: int | None = None, rank: int | None = None) -> str:
    return json.dumps({"stage": stage, "replica": replica, "rank": rank, "message": message})


def _decode(text: str) -> StageFailure:
    data = json.loads(text)
    failure = StageFailure(str(data["message"]), data["stage"])
    failure.replica, failure.rank = data.get("replica"), data.get("rank")
    return failure


class FailureMonitor:
    """The failure state of stage `rank`, shared by its compute, send and monitor threads.

    Args:
        rank, world_size: this process's place.
        layout: the mesh (`topology.MeshLayout`); None: one process per stage, rank = stage.
        ctl: the run's control store (a PrefixStore), used by the compute thread.
        monitor_ctl: a second connection to it for the monitor thread.
        timeout: the run's timeout in seconds (for blame).
        forced_exit: called with the failure line when the compute thread did not stop in
            time after a peer failed; None: never force.
    """

    def __init__(self, rank: int, world_size: int, ctl: Any, monitor_ctl: Any, timeout: float,
                 forced_exit: Callable[[str], None] | None = None,
                 layout: Any = None) -> None:
        self.rank, self.world_size, self.ctl, self.timeout = rank, world_size, ctl, timeout
        #: the mesh (`topology.MeshLayout`): rank -> (stage, replica) and its name in failure
        #: lines ("stage k", or "stage k replica j" with data parallelism)
        self.layout = layout
        self.failure: StageFailure | None = None
        #: (peer, since) while the compute thread is blocked on a peer
        self.waiting: tuple[int, float] | None = None
        self._forced_exit = forced_exit
        self._monitor_ctl = monitor_ctl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"layerpipe-monitor-{rank}", daemon=True)
        self._thread.start()

    def name(self, rank: int | None) -> str:
        return self.layout.describe(rank) if self.layout is not None else f"stage {rank}"

    def coords(self, rank: int | None) -> tuple[int | None, int | None]:
        """(stage, replica) of `rank` in the mesh."""
        if rank is None or self.layout is None:
            return rank, (None if rank is None else 0)
        return self.layout.coords(rank)

    def check(self) -> None:
        """Raise the recorded failure of a peer or of a send, if any."""
        if self.failure is not None:
            raise self.failure

    # -- recording -----------------------------------------------------------------------------
    def record(self, message: str, rank: int | None, local: bool) -> StageFailure:
        """Record this failure (of process `rank`; None: unknown) as the run's unless another
        came first; return the failure this process should raise (the first one recorded).
        Stored as data: the mesh coordinates of `rank` and the line."""
        stage, replica = self.coords(rank)
        mine = _encode(message, stage, replica, rank)
        try:
            first = self.ctl.compare_set("error", "", mine).decode() or mine
        except Exception:  # the store is gone too
            log.debug("rank %d could not record the failure in the store", self.rank)
            first = mine
        if first != mine:
            return _decode(first)
        return StageFailure(message, stage, local=local, replica=replica, rank=rank)

    def fail_local(self, exc: BaseException) -> StageFailure:
        """This stage raised `exc`: record it as the run's failure."""
        if isinstance(exc, StageFailure):
            return exc
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, LayerpipeError):  # an unexpected error: name its type
            text = f"{type(exc).__name__}: {text}"
        failure = self.record(f"{self.name(self.rank)} failed: {text}", self.rank, local=True)
        self.failure = self.failure or failure
        return failure

    def peer_failed(self, peer: int, exc: BaseException) -> StageFailure:
        """A message to or from `peer` failed with `exc`: find out why, record, return it."""
        self.failure = self.failure or self._describe(peer, exc)
        return self.failure

    def collective_failed(self, what: str, missing: list[int], exc: BaseException) -> StageFailure:
        """A barrier or gather failed; `missing`: the ranks that never arrived."""
        failure = self.recorded(wait=1.0)
        if failure is None:
            if missing:
                failure = self.record(f"{self.name(missing[0])} did not arrive at {what}", missing[0], local=False)
            else:
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                failure = self.record(f"{what} failed on {self.name(self.rank)}: {text}", None, local=False)
        self.failure = self.failure or failure
        return failure

    def group_failed(self, peers: list[int], exc: BaseException) -> StageFailure:
        """The gradient all-reduce over this stage's replicas failed: blame the peer whose
        heartbeat stopped (or the first one), as for a failed message."""
        suspect = peers[0] if peers else self.rank
        for peer in peers:
            try:
                stamp = float(self.ctl.get(f"status/{peer}").decode().split()[0])
            except Exception:
                suspect = peer
                break
            if time.time() - stamp > STALE_S:
                suspect = peer
                break
        return self.peer_failed(suspect, exc)

    def recorded(self, wait: float = 0.0) -> StageFailure | None:
        """The run's recorded failure, waiting up to `wait` seconds for one to appear."""
        deadline = time.monotonic() + wait
        while True:
            try:
                if self.ctl.check(["error"]):
                    return _decode(self.ctl.get("error").decode())
            except Exception:
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _describe(self, peer: int, exc: BaseException) -> StageFailure:
        recorded = self.recorded(wait=1.0)
        if recorded is not None:
            return recorded
        text = str(exc).lower()
        if "timed out" in text or "timeout" in text:
            message, stage = self._blame(peer)
        elif "closed" in text or "reset" in text or "broken pipe" in text:
            stage, message = peer, f"{self.name(peer)} is gone: its connection closed (the process crashed or was killed)"
        else:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            stage, message = peer, f"the link to {self.name(peer)} failed: {first}"
        log.debug("rank %d: %s (%s)", self.rank, message, exc)
        return self.record(message, stage, local=False)

    def _blame(self, peer: int) -> tuple[str, int]:
        """After waiting `timeout` on `peer`: follow "waits for" from `peer` to the stage that
        is really stuck; (line, stage)."""
        seen = {self.rank}
        stage = peer
        while True:
            seen.add(stage)
            try:
                stamp, waiting_on, since = (float(v) for v in self.ctl.get(f"status/{stage}").decode().split())
            except Exception:
                return f"{self.name(stage)} sent nothing for {self.timeout:g} s and has no status (see --timeout)", stage
            now = time.time()
            if now - stamp > STALE_S:
                return (f"{self.name(stage)} is not responding: no heartbeat for {now - stamp:.0f} s "
                        f"(stopped or frozen; see --timeout)"), stage
            nxt = int(waiting_on)
            if nxt < 0 or nxt in seen or now - since < self.timeout / 2:
                return f"{self.name(stage)} sent nothing for {self.timeout:g} s: it is alive but stuck (see --timeout)", stage
            stage = nxt

    # -- the monitor thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        store = self._monitor_ctl
        noticed: float | None = None
        store_down: float | None = None
        while not self._stop.wait(HEARTBEAT_S if store_down is None else 2 * HEARTBEAT_S):
            if self.failure is None or store_down is None:
                try:
                    src, since = self.waiting if self.waiting is not None else (-1, 0.0)
                    store.set(f"status/{self.rank}", f"{time.time():.3f} {src} {since:.3f}")
                    if self.failure is None and store.check(["error"]):
                        self.failure = _decode(store.get("error").decode())
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

    def stop(self, join: float | None = None) -> None:
        self._stop.set()
        if join is not None:
            self._thread.join(timeout=join)
