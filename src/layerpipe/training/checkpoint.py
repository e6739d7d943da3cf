"""Checkpoints of a run, the same for both engines: one file per process, one marker that commits them.

    run_dir/checkpoint-rank0-epoch4.pt   ...  one per process (the single-process engine: one)
    run_dir/checkpoint.json              {"epoch": 4, "world_size": 2, "files": [...], "sha256": [...]}

Every process writes its file atomically; once all are on disk, rank 0 writes the marker
(atomically), so a crash in between leaves the previous checkpoint in force. Files are read
with `torch.load(weights_only=True)` (they hold tensors, numbers, strings, lists and dicts
only, so a crafted file cannot run code) after their SHA-256 is checked against the marker:
a corrupt or foreign file is refused with one line naming it, never trained on. Each process
keeps its files of the last two checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from layerpipe.errors import LayerpipeError
from layerpipe.report.records import atomic_torch_save, atomic_write_bytes
from layerpipe.training.config import RESUME_KEYS, TrainConfig

MARKER = "checkpoint.json"
FORMAT = "layerpipe-checkpoint/2"


def checkpoint_path(run_dir: Path, rank: int, epoch: int) -> Path:
    return run_dir / f"checkpoint-rank{rank}-epoch{epoch}.pt"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path,
    rank: int,
    world_size: int,
    epoch: int,
    state: dict[str, Any],
    gather: Callable[[Any], list[Any] | None],
) -> None:
    """Write this process's `state`; `gather(obj)` collects every process's obj on rank 0
    (and is the barrier that makes sure every file is on disk before the marker)."""
    previous = committed_epoch(run_dir)
    path = checkpoint_path(run_dir, rank, epoch)
    atomic_torch_save({"format": FORMAT, "rank": rank, "world_size": world_size, "epoch": epoch, **state}, path)
    hashes = gather(file_sha256(path))
    if rank == 0:
        assert hashes is not None
        marker = {"format": FORMAT, "epoch": epoch, "world_size": world_size,
                  "files": [checkpoint_path(run_dir, r, epoch).name for r in range(world_size)], "sha256": hashes}
        atomic_write_bytes(run_dir / MARKER, json.dumps(marker, indent=1).encode())
    if previous is not None:  # the committed checkpoint before this one stays; older ones go
        for old in run_dir.glob(f"checkpoint-rank{rank}-epoch*.pt"):
            e = old.stem.rsplit("epoch", 1)[1]
            if e.isdigit() and int(e) < previous:
                old.unlink(missing_ok=True)


def committed_epoch(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / MARKER).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(run_dir: Path, rank: int, world_size: int, config: TrainConfig) -> dict[str, Any]:
    """This process's state of the committed checkpoint, verified (hash, format, config)."""
    marker_path = run_dir / MARKER
    if not marker_path.exists():
        raise LayerpipeError(f"--resume: no checkpoint in {run_dir} (no {MARKER})")
    try:
        marker = json.loads(marker_path.read_text())
        files, hashes, saved_world = marker["files"], marker["sha256"], int(marker["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LayerpipeError(f"cannot read {marker_path}: {exc}") from None
    if saved_world != world_size:
        raise LayerpipeError(f"the checkpoint in {run_dir} was made by {saved_world} process(es), "
                             f"this run has {world_size}")
    path = run_dir / files[rank]
    if not path.exists():
        raise LayerpipeError(f"checkpoint file {path} is missing")
    if file_sha256(path) != hashes[rank]:
        raise LayerpipeError(f"checkpoint file {path} is corrupt or foreign (its SHA-256 does not match {MARKER})")
    try:
        with warnings.catch_warnings():  # a crafted file's pickle protocol warning: not the user's concern
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a checkpoint, or one that would need code to load
        raise LayerpipeError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or int(state.get("rank", -1)) != rank:
        raise LayerpipeError(f"{path} is not a layerpipe checkpoint of rank {rank}")
    check_checkpoint_config(state, config, f"the checkpoint in {run_dir}")
    return state


def check_checkpoint_config(state: dict[str, Any], config: TrainConfig, what: str) -> None:
    """Refuse to resume with settings that change what the saved state means; name them all."""
    saved = dict(state.get("config", {}))
    differ = [f"{key}={saved.get(key)!r} (now {getattr(config, key)!r})" for key in RESUME_KEYS
              if saved.get(key) != getattr(config, key)]
    if differ:
        raise LayerpipeError(f"{what} was made with other settings: {', '.join(differ)}")
