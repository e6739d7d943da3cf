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

`layerpipe launch --nproc K script.py [ARGS...]` runs a Python script (one that calls
`layerpipe.train_pipeline`, say) as K ranks the same way; `torchrun --nproc-per-node K
script.py` does too.

The child side of `layerpipe train --nproc K` is `python -m layerpipe.cli.train`: it runs the
train command with the arguments the parent parsed (passed as JSON in LAYERPIPE_WORKER_ARGS).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

WORKER_ARGS_ENV = "LAYERPIPE_WORKER_ARGS"
#: the launcher's pid, so that a child can tell it has already gone (see `die_with_parent`)
LAUNCHER_PID_ENV = "LAYERPIPE_LAUNCHER_PID"
#: quiet C++ logging for children: a forced exit must not print c10/gloo warnings and stacks
QUIET_ENV = {"TORCH_CPP_LOG_LEVEL": "ERROR", "TORCH_SHOW_CPP_STACKTRACES": "0"}
ERROR_FILE_ENV = "LAYERPIPE_ERROR_FILE"
#: glibc settings the launcher gives its children (see `launch`)
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="run a Python script as --nproc local processes, one pipeline stage each",
                       description="Run SCRIPT as NPROC local ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT set; gloo on "
                       "127.0.0.1), as torchrun --nproc-per-node NPROC would; if one fails the others are stopped "
                       "and one line names the stage. The script calls layerpipe.train_pipeline (see the README).")
    p.add_argument("--nproc", type=int, required=True, help="number of processes (= pipeline stages)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per process (default: cores / NPROC)")
    p.add_argument("script", help="the Python script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(run=run)


def run(args) -> int:
    import sys

    from layerpipe.errors import LayerpipeError

    if args.nproc < 1:
        raise LayerpipeError(f"--nproc must be at least 1, got {args.nproc}")
    if not Path(args.script).is_file():
        raise LayerpipeError(f"no such script: {args.script}")
    result = launch([sys.executable, args.script, *args.args], args.nproc, threads_per_process=args.threads)
    if result.returncode:
        raise LayerpipeError(result.message)
    return 0


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

    from layerpipe.cli.common import signals_as_interrupt

    start = time.monotonic()
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    # SIGTERM, SIGHUP and SIGINT raise LauncherStopped while the launcher waits, so that the
    # cleanup below (terminate the children, remove the temp folder) runs
    stop_on = ("SIGTERM", "SIGHUP", "SIGINT")
    with signals_as_interrupt(signals=stop_on, raise_as=LauncherStopped), tempfile.TemporaryDirectory(prefix="layerpipe-launch-") as tmp:
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
                child_env[LAUNCHER_PID_ENV] = str(os.getpid())
                for key, value in QUIET_ENV.items():
                    child_env.setdefault(key, value)
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
            _ignore_signals()  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            _terminate(procs, kill_after)
            raise
        finally:
            del store


class LauncherStopped(KeyboardInterrupt):
    """The launcher got SIGTERM, SIGHUP or SIGINT (its args[0] names the signal): its children
    are terminated, its temporary folder removed, and the command ends with one line."""


def _ignore_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


def die_with_parent(ignore_sigint: bool = False) -> None:
    """In a child: ask Linux to send SIGKILL when the parent dies, even by SIGKILL
    (prctl PR_SET_PDEATHSIG), and leave at once if it is already gone. With `ignore_sigint`,
    Ctrl-C in the terminal is left to the parent (which stops this child). No-op elsewhere."""
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    expected = os.environ.get(LAUNCHER_PID_ENV)
    parent = os.getppid()
    if (expected and str(parent) != expected) or parent == 1:
        os._exit(1)  # the parent died before prctl took effect


def _watch(procs: list[subprocess.Popen], deadline: float | None, dp: int = 1) -> tuple[int, str] | None:
    """Wait until every child succeeded (None) or one failed: (rank, how it ended)."""
    while True:
        running = False
        for rank, p in enumerate(procs):
            code = p.poll()
            if code is None:
                running = True
            elif code != 0:
                from layerpipe.engine.distributed.topology import MeshLayout

                name = MeshLayout(len(procs), dp).describe(rank)
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


# -- the child side: one line, then leave ------------------------------------------------------------
def leave_with_failure(exc: BaseException, rank0: bool, command: str = "layerpipe train") -> NoReturn:
    """A stage process failed: report one line (to the launcher, or on stderr from rank 0 and
    from the stage where it started) and leave at once: exiting closes this process's
    sockets, which tells its neighbours without waiting for a timeout."""
    from layerpipe.engine.distributed import StageFailure
    from layerpipe.errors import LayerpipeError

    if isinstance(exc, KeyboardInterrupt):
        leave_now(None, code=130)
    message = str(exc) if isinstance(exc, LayerpipeError) else f"{type(exc).__name__}: {exc}"
    local = not isinstance(exc, StageFailure) or exc.local
    if not report_failure(message) and (rank0 or local):
        print(f"{command}: error: {message}", file=sys.stderr)
    leave_now(None, code=2)


def leave_now(message: str | None, code: int = 2, command: str = "layerpipe train") -> NoReturn:
    """Leave this process now (the monitor's forced exit passes the failure line)."""
    import logging

    if message is not None:  # the monitor thread gave up waiting for the compute thread
        if not report_failure(message):
            print(f"{command}: error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
