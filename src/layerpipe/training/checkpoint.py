"""Checkpoints of a run, the same for both engines: one file per stage, one marker that commits them.

    run_dir/checkpoint-stage0-epoch4.pt  ...  one per stage (the single-process engine: one, all stages)
    run_dir/checkpoint.json              {"epoch": 4, "stages": 2, "dp": 2, "files": [...], "sha256": [...]}

The state of a run is one state per stage: the data-parallel replicas of a stage are
identical (same updates, same weight history), so replica 0 of each stage writes the stage's
file and every replica of a stage reads it on resume. A run saved with R replicas therefore
resumes with any other R (resharding over R without torch.distributed.checkpoint), as long
as the global microbatch (R x batch size) is the same. The number of stages K must match.
BatchNorm running statistics are replica 0's.

Each writer writes its file atomically; once all are on disk, rank 0 writes the marker
(atomically), so a crash in between leaves the previous checkpoint in force. Files are read
with `torch.load(weights_only=True)` (they hold tensors, numbers, strings, lists and dicts
only, so a crafted file cannot run code) after their SHA-256 is checked against the marker:
a corrupt or foreign file is refused with one line naming it, never trained on. Each writer
keeps its files of the last two checkpoints. `layerpipe export` merges the stage files'
module states into one plain state_dict (`model_state_dict`).
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
FORMAT = "layerpipe-checkpoint/3"


def checkpoint_path(run_dir: Path, stage: int, epoch: int) -> Path:
    return run_dir / f"checkpoint-stage{stage}-epoch{epoch}.pt"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path,
    stage: int,
    num_stages: int,
    epoch: int,
    state: dict[str, Any],
    gather: Callable[[Any], list[Any] | None],
    *,
    writer: bool = True,
    dp: int = 1,
) -> None:
    """Write stage `stage`'s `state` (when this process is the stage's `writer`: replica 0);
    `gather(obj)` collects every process's obj on rank 0 (and is the barrier that makes sure
    every file is on disk before the marker). `num_stages`: files of the checkpoint (K);
    `dp`: replicas per stage (R), recorded."""
    previous = committed_epoch(run_dir)
    path = checkpoint_path(run_dir, stage, epoch)
    if writer:
        atomic_torch_save({"format": FORMAT, "stage": stage, "stages": num_stages, "dp": dp, "epoch": epoch, **state},
                          path)
    hashes = gather((stage, file_sha256(path)) if writer else None)
    if hashes is not None:  # rank 0
        by_stage = dict(h for h in hashes if h is not None)
        assert sorted(by_stage) == list(range(num_stages)), by_stage
        marker = {"format": FORMAT, "epoch": epoch, "stages": num_stages, "dp": dp, "world_size": len(hashes),
                  "files": [checkpoint_path(run_dir, k, epoch).name for k in range(num_stages)],
                  "sha256": [by_stage[k] for k in range(num_stages)]}
        atomic_write_bytes(run_dir / MARKER, json.dumps(marker, indent=1).encode())
    if previous is not None and writer:  # the committed checkpoint before this one stays; older ones go
        for old in run_dir.glob(f"checkpoint-stage{stage}-epoch*.pt"):
            e = old.stem.rsplit("epoch", 1)[1]
            if e.isdigit() and int(e) < previous:
                old.unlink(missing_ok=True)


def committed_epoch(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / MARKER).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_marker(run_dir: Path) -> dict[str, Any]:
    """The committed checkpoint's marker, checked for its keys."""
    marker_path = run_dir / MARKER
    if not marker_path.exists():
        raise LayerpipeError(f"no checkpoint in {run_dir} (no {MARKER})")
    try:
        marker = json.loads(marker_path.read_text())
        if marker.get("format") != FORMAT:
            raise ValueError(f"format {marker.get('format')!r}, expected {FORMAT!r}")
        int(marker["stages"]), list(marker["files"]), list(marker["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LayerpipeError(f"cannot read {marker_path}: {exc}") from None
    return marker


def read_stage_file(run_dir: Path, marker: dict[str, Any], stage: int) -> dict[str, Any]:
    """Stage `stage`'s file of the committed checkpoint, verified against the marker."""
    path = run_dir / marker["files"][stage]
    if not path.exists():
        raise LayerpipeError(f"checkpoint file {path} is missing")
    if file_sha256(path) != marker["sha256"][stage]:
        raise LayerpipeError(f"checkpoint file {path} is corrupt or foreign (its SHA-256 does not match {MARKER})")
    try:
        with warnings.catch_warnings():  # a crafted file's pickle protocol warning: not the user's concern
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a checkpoint, or one that would need code to load
        raise LayerpipeError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or int(state.get("stage", -1)) != stage:
        raise LayerpipeError(f"{path} is not a layerpipe checkpoint of stage {stage}")
    return state


def load_checkpoint(run_dir: Path, stage: int, num_stages: int, config: TrainConfig, dp: int = 1) -> dict[str, Any]:
    """Stage `stage`'s state of the committed checkpoint, verified (hash, format, config);
    every replica of the stage reads the same file, whatever R the checkpoint was made with."""
    if not (run_dir / MARKER).exists():
        raise LayerpipeError(f"--resume: no checkpoint in {run_dir} (no {MARKER})")
    marker = read_marker(run_dir)
    if int(marker["stages"]) != num_stages:
        raise LayerpipeError(f"the checkpoint in {run_dir} has {marker['stages']} stage file(s), "
                             f"this run has {num_stages}")
    state = read_stage_file(run_dir, marker, stage)
    check_checkpoint_config(state, config, f"the checkpoint in {run_dir}", dp)
    return state


def model_state_dict(run_dir: Path) -> dict[str, torch.Tensor]:
    """The committed checkpoint's model weights as one plain state_dict (the stage files'
    module states merged; replica 0's BatchNorm statistics)."""
    marker = read_marker(run_dir)
    merged: dict[str, torch.Tensor] = {}
    for k in range(int(marker["stages"])):
        engine = read_stage_file(run_dir, marker, k)["engine"]
        stages = [engine["stage"]] if "stage" in engine else engine["stages"]  # distributed, or local
        for s in stages:
            merged.update(s["module"])
    return merged


def check_checkpoint_config(state: dict[str, Any], config: TrainConfig, what: str, dp: int = 1) -> None:
    """Refuse to resume with settings that change what the saved state means; name them all.
    The batch size compares as the global microbatch (replicas x batch size), so that a
    checkpoint reshards over the replicas."""
    saved = {"max_stale_samples": 0, **state.get("config", {})}  # older checkpoints: the microbatch at every depth
    saved_dp = int(state.get("dp", 1))
    differ = [f"{key}={saved.get(key)!r} (now {getattr(config, key)!r})" for key in RESUME_KEYS
              if key != "batch_size" and saved.get(key) != getattr(config, key)]
    if saved.get("batch_size") is not None and saved["batch_size"] * saved_dp != config.batch_size * dp:
        differ.append(f"global microbatch={saved['batch_size'] * saved_dp} ({saved_dp} x {saved['batch_size']}; "
                      f"now {dp} x {config.batch_size})" if saved_dp != 1 or dp != 1 else
                      f"batch_size={saved.get('batch_size')!r} (now {config.batch_size!r})")
    if differ:
        raise LayerpipeError(f"{what} was made with other settings: {', '.join(differ)}")
