"""The distributed runtime: one process per pipeline stage on torch.distributed.

By concern: `topology` (where a process sits: rank, backend, the (pp, dp) grid),
`transport` (point-to-point messages, collectives, the store), `monitor` (failures as data:
the first failure, heartbeats, blame for a timeout), `worker` (one stage's tick program, its
pipelined evaluation and its state), `buckets` (data parallelism: the stage's gradients
summed over its replicas), `tied` (parameters read by stages in different processes:
gradient parts to the owner, new values back). The training
loop drives a `StageWorker` through `layerpipe.training.engines.DistributedEngine`.
"""
from layerpipe.engine.distributed.monitor import FailureMonitor, StageFailure
from layerpipe.engine.distributed.topology import World, choose_backend
from layerpipe.engine.distributed.transport import Comm
from layerpipe.engine.distributed.boundaries import boundary_specs
from layerpipe.engine.distributed.faults import FAULT_ENV
from layerpipe.engine.distributed.worker import EpochStats, StageWorker

__all__ = ["FAULT_ENV", "Comm", "EpochStats", "FailureMonitor", "StageFailure", "StageWorker", "World",
           "boundary_specs", "choose_backend"]
