"""`layerpipe train --nproc K`: start K local processes, one pipeline stage each.

    result = launch([sys.executable, "worker.py"], nproc=3)   # any command (the tests use this)
    if result.returncode: print(result.message)               # one line naming the stage

Each child gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and the
MASTER_PORT of a TCPStore this launcher hosts (bound to port 0: the kernel picks a free port,
no race), so the store outlives every child; the children use gloo on loopback. It also sets
OMP_NUM_THREADS and glibc's allocator thresholds (see `launch`). A child
writes its failure line to LAYERPIPE_ERROR_FILE instead of printing it. When a child exits
with an error the launcher terminates the others (SIGTERM, then SIGKILL) and reports one
line: the failing child's own report, or how it died.

The child side of `layerpipe train --nproc K` is `python -m layerpipe.cli.train`: it runs the
train command with the arguments the parent parsed (passed as JSON in LAYERPIPE_WORKER_ARGS).
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKER_ARGS_ENV = "LAYERPIPE_WORKER_ARGS"
ERROR_FILE_ENV = "LAYERPIPE_ERROR_FILE"
#: glibc settings the launcher gives its children (see `launch`)
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@dataclass
class LaunchResult:
    returncode: int
    #: one line naming the failing stage ("" on success)
    message: str = ""
    #: exit code of every child (negative: killed by that signal)
    codes: list[int | None] = field(default_factory=list)
    seconds: float = 0.0


def launch(
    cmd: list[str],
    nproc: int,
    *,
    env: dict[str, str] | None = None,
    threads_per_process: int | None = None,
    malloc_tuning: bool = True,
    grace: float = 1.0,
    kill_after: float = 5.0,
    deadline: float | None = None,
    dp: int = 1,
) -> LaunchResult:
    """Run `cmd` as `nproc` ranks and wait for them. On the first failure the others get
    `grace` seconds to leave by themselves (the failure ripples through the pipeline in
    milliseconds), then SIGTERM, then SIGKILL after `kill_after`. `deadline` (seconds)
    bounds the whole run.

    Children get OMP_NUM_THREADS (cores / nproc) and, with `malloc_tuning`, glibc's
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB, unless already set. Every
    tick frees and reallocates tensors of megabytes (activations, gradients, weight
    copies); by default glibc hands such blocks back to the OS and page-faults them in again
    (measured: a third of a 2-stage MLP tick on this CPU). Memory then stays at its
    steady-state peak instead of shrinking between ticks. `dp`: replicas per stage (R), only
    to name a child in the report ("stage 1 replica 0"; rank = stage * R + replica)."""
    import torch.distributed as dist

    start = time.monotonic()
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="layerpipe-launch-") as tmp:
        error_files = [Path(tmp) / f"error-rank{r}.txt" for r in range(nproc)]
        try:
            for r in range(nproc):
                child_env = dict(os.environ if env is None else env)
                child_env.update(
                    RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), LAYERPIPE_STORE_HOSTED="1",
                    **{ERROR_FILE_ENV: str(error_files[r])},
                )
                child_env.setdefault("OMP_NUM_THREADS", str(threads))
                if malloc_tuning:
                    for key in MALLOC_ENV:
                        child_env.setdefault(key, str(1 << 30))
                procs.append(subprocess.Popen(cmd, env=child_env))
            failed = _watch(procs, deadline=None if deadline is None else start + deadline, dp=dp)
            if failed is None:
                return LaunchResult(0, "", [p.returncode for p in procs], time.monotonic() - start)
            rank, why = failed
            # let the others notice and report by themselves, then make sure they are gone
            _wait_all(procs, grace)
            _terminate(procs, kill_after)
            own = _read(error_files[rank])
            message = own or why
            return LaunchResult(1, message, [p.returncode for p in procs], time.monotonic() - start)
        except BaseException:
            _terminate(procs, kill_after)
            raise
        finally:
            del store


def _watch(procs: list[subprocess.Popen], deadline: float | None, dp: int = 1) -> tuple[int, str] | None:
    """Wait until every child succeeded (None) or one failed: (rank, how it ended)."""
    while True:
        running = False
        for rank, p in enumerate(procs):
            code = p.poll()
            if code is None:
                running = True
            elif code != 0:
                name = f"stage {rank // dp} replica {rank % dp}" if dp > 1 else f"stage {rank}"
                return rank, f"{name} {_how(code)} without reporting an error"
        if not running:
            return None
        if deadline is not None and time.monotonic() > deadline:
            return 0, "the run exceeded its deadline"
        time.sleep(0.05)


def _how(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _wait_all(procs: list[subprocess.Popen], seconds: float) -> None:
    end = time.monotonic() + seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _terminate(procs: list[subprocess.Popen], kill_after: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    end = time.monotonic() + kill_after
    for p in alive:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return ""


def report_failure(message: str) -> bool:
    """In a launched child: write the failure line for the launcher. False outside one."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return False
    try:
        Path(path).write_text(message + "\n")
    except OSError:
        return False
    return True
