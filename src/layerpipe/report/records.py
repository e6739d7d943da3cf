"""Run folders and metrics as JSON lines: a header with the resolved config and git commit,
then one record per epoch. Files are written atomically where losing them would hurt."""
from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current commit of the repository holding the code, or None outside a checkout.
    LAYERPIPE_COMMIT, where set, names it instead (a copied tree whose .git is stale or absent)."""
    if os.environ.get("LAYERPIPE_COMMIT"):
        return os.environ["LAYERPIPE_COMMIT"]
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=here, capture_output=True, text=True, timeout=5)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Machine and versions, for records and benchmark reports."""
    import torch

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@functools.cache
def _umask() -> int:
    # reading the umask means setting it: done once, not on every write (other threads
    # creating files in between would get the temporary 0 mask)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the prefix lets the next run in this folder find (and remove) a temp file a kill left
    fd, tmp = tempfile.mkstemp(prefix=f".layerpipe-tmp-{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file and an atomic rename."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class MetricsLog:
    """`metrics.jsonl` in a run folder: header line {"config", "environment"}, then records."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(json.dumps({"header": True, "config": config, "environment": environment()}) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return lines[0], lines[1:]
