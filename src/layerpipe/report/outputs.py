"""Output places, checked before any training starts, and the state of a run folder.

    check_run_dir(path, resume=False, overwrite=False)   # one line if the folder holds a run
    check_output_file(path, "--save", overwrite=False)    # a folder, an unwritable place, ...
    write_status(run_dir, "running")                      # run_dir/status.json
    clean_stale_temp(run_dir)                             # temp files of a write cut by a kill

A run folder holds `status.json`: {"status": "running" | "complete" | "failed" |
"interrupted", "reason": ..., "pid": ..., "time": ...}. A run killed outright (SIGKILL, power)
stays "running" with a pid that no longer exists: incomplete all the same.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path

from layerpipe.errors import LayerpipeError

#: prefix of every temporary file `records.atomic_write_bytes` makes (then renames)
TEMP_PREFIX = ".layerpipe-tmp-"
STATUS = "status.json"
#: files that make a folder hold a run
RUN_FILES = ("metrics.jsonl", "checkpoint.json")
RUN_GLOBS = ("checkpoint-stage*-epoch*.pt",)
#: what `--overwrite` removes from a run folder before the new run
OWN_FILES = (*RUN_FILES, STATUS, "learning_curve.png")


def run_files(folder: Path) -> list[Path]:
    found = [folder / n for n in RUN_FILES if (folder / n).exists()]
    for pattern in RUN_GLOBS:
        found += sorted(folder.glob(pattern))
    return found


def _probe_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LayerpipeError(f"cannot write to {what} {folder}: {exc.strerror or exc}") from None


def check_run_dir(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                  flag: str = "--run-dir") -> Path:
    """The run folder, ready: refused (one line) if it is a file, not writable, already holds
    a run (without `resume` or `overwrite`), or holds none to resume. With `overwrite` the old
    run's files are removed; stale temporary files are cleaned in every case."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise LayerpipeError(f"{flag} {folder} is a file, not a folder")
    if resume and overwrite:
        raise LayerpipeError("--resume continues the run in the folder, --overwrite replaces it: choose one")
    existing = run_files(folder) if folder.is_dir() else []
    if resume and not (folder / "checkpoint.json").exists():
        raise LayerpipeError(f"--resume: no checkpoint in {folder} (no checkpoint.json); "
                             "was the run started with --checkpoint-every N?")
    if existing and not resume and not overwrite:
        raise LayerpipeError(f"{flag} {folder} already holds a run ({existing[0].name}); continue it with --resume, "
                             "replace it with --overwrite, or choose another folder")
    _probe_writable(folder, "the run folder")
    if overwrite:
        for p in [folder / n for n in OWN_FILES] + [p for g in RUN_GLOBS for p in folder.glob(g)]:
            p.unlink(missing_ok=True)
    clean_stale_temp(folder)
    return folder


def check_output_file(path: str | os.PathLike, flag: str, *, overwrite: bool = False) -> Path:
    """A file the run will write at the end: refused now if it is a folder, exists (without
    `overwrite`), or cannot be written there."""
    target = Path(path)
    if target.is_dir():
        raise LayerpipeError(f"{flag} {target} is a folder; give a file name")
    if target.exists() and not overwrite:
        raise LayerpipeError(f"{flag} {target} exists; use --overwrite to replace it, or another name")
    if target.parent.exists() and not target.parent.is_dir():
        raise LayerpipeError(f"cannot write {flag} {target}: {target.parent} is a file")
    _probe_writable(target.parent, f"the folder of {flag}")
    return target


def check_output_dir(path: str | os.PathLike, flag: str, results: tuple[str, ...], *, overwrite: bool = False) -> Path:
    """A folder the run fills: refused if it is a file, holds results (without `overwrite`),
    or is not writable."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise LayerpipeError(f"{flag} {folder} is a file, not a folder")
    held = [n for n in results if (folder / n).exists()]
    if held and not overwrite:
        raise LayerpipeError(f"{flag} {folder} already holds results ({held[0]}); use --overwrite to replace them, "
                             "or another folder")
    _probe_writable(folder, flag)
    clean_stale_temp(folder)
    return folder


def clean_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files left by an atomic write that a kill cut short (before the
    rename); the files they were to replace are untouched. Call before the run writes."""
    removed = []
    for p in Path(folder).glob(TEMP_PREFIX + "*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def write_status(folder: str | os.PathLike, status: str, reason: str | None = None) -> None:
    from layerpipe.report.records import atomic_write_bytes

    record = {"status": status, "reason": reason, "pid": os.getpid(),
              "time": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        atomic_write_bytes(Path(folder) / STATUS, (json.dumps(record) + "\n").encode())
    except OSError:
        pass  # the status is a courtesy; never the reason a run fails


def read_status(folder: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(folder) / STATUS).read_text())
    except (OSError, ValueError):
        return None
