"""Fault injection for the tests: `LAYERPIPE_FAULT=RANK:MODE:TICK` makes rank RANK exit, raise
or hang at its tick TICK (tests/test_distributed.py, tests/test_faults.py)."""
from __future__ import annotations

import logging
import os
import time

from layerpipe.errors import LayerpipeError

log = logging.getLogger(__name__)

#: environment variable of the fault-injection hook used by the tests: "RANK:MODE:TICK",
#: MODE one of exit (os._exit(3)), raise (RuntimeError), hang (sleep in the compute thread)
FAULT_ENV = "LAYERPIPE_FAULT"


def parse_fault(spec: str | None, rank: int) -> tuple[str, int] | None:
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


def inject(mode: str, rank: int, tick: int) -> None:
    log.warning("rank %d: injected fault %r at tick %d", rank, mode, tick)
    if mode == "exit":
        logging.shutdown()
        os._exit(3)
    if mode == "raise":
        raise RuntimeError(f"injected fault at tick {tick}")
    time.sleep(10**6)  # hang
