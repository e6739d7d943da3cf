"""Faults a run must survive with one clear line, a non-zero exit, nothing good lost and no
process left: corrupt and crafted checkpoints (one process and one per stage), a stage that
dies or freezes, signals to the `--nproc` launcher (SIGTERM, SIGHUP, SIGINT, SIGKILL),
SIGTERM to `compare --jobs 2`, an interrupted run, stale temp files of a cut write."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerpipe.cli.main import main
from layerpipe.report.outputs import read_status
from layerpipe.training.checkpoint import MARKER, file_sha256

SMALL = ["train", "--model", "mlp", "--dataset", "digits", "--samples", "300", "--no-progress", "--weights", "stash"]


# -- helpers -------------------------------------------------------------------------------------------------
def cli(args: list[str], env: dict | None = None, timeout: float = 100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerpipe", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def wait_for(predicate, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def trained_run(tmp_path: Path, nproc: int | None = None) -> Path:
    run = tmp_path / f"run{nproc or 1}"
    extra = ["--nproc", str(nproc)] if nproc else ["--stages", "2"]
    if nproc:
        out = cli([*SMALL, "--epochs", "2", "--checkpoint-every", "1", "--run-dir", str(run), *extra])
        assert out.returncode == 0, out.stderr
    else:
        assert main([*SMALL, "--epochs", "2", "--checkpoint-every", "1", "--run-dir", str(run), *extra]) == 0
    return run


def craft(path: Path, witness: Path) -> None:
    """A pickle that would run code on load (touch `witness`), in place of a checkpoint file,
    with the marker's SHA-256 updated: only weights_only stands between it and a shell."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    path.write_bytes(pickle.dumps({"format": "layerpipe-checkpoint/2", "payload": Evil()}))
    marker_path = path.parent / MARKER
    marker = json.loads(marker_path.read_text())
    marker["sha256"][marker["files"].index(path.name)] = file_sha256(path)
    marker_path.write_text(json.dumps(marker))


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(100, len(data), len(data) // 7):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# -- checkpoints, one process --------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_corrupt_and_crafted_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    run = trained_run(tmp_path)
    resume = [*SMALL, "--stages", "2", "--epochs", "3", "--resume", "--run-dir", str(run)]
    before = read_status(run)
    assert before["status"] == "complete"
    ckpt = run / "checkpoint-stage0-epoch2.pt"
    good = ckpt.read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()

    flip(ckpt)
    assert main(resume) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(ckpt) in lines[0] and "corrupt" in lines[0], lines

    witness = tmp_path / "pwned"
    craft(ckpt, witness)
    assert main(resume) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(ckpt) in lines[0], lines
    assert not witness.exists()
    # the folder's run is untouched: its metrics, its status
    assert (run / "metrics.jsonl").read_text() == metrics
    assert read_status(run)["status"] == "complete"

    ckpt.write_bytes(good)  # and the good one still resumes
    marker = json.loads((run / MARKER).read_text())
    marker["sha256"][0] = file_sha256(ckpt)
    (run / MARKER).write_text(json.dumps(marker))
    assert main(resume) == 0
    assert read_status(run)["status"] == "complete"


@pytest.mark.timeout(60)
def test_resume_past_the_requested_epochs_is_refused_in_one_line(tmp_path, capsys):
    run = trained_run(tmp_path)
    capsys.readouterr()
    assert main([*SMALL, "--stages", "2", "--epochs", "1", "--resume", "--run-dir", str(run)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "epoch 2, past --epochs 1: nothing to train" in lines[0]
    assert read_status(run)["status"] == "complete"
    # at exactly its epoch: nothing to train, the checkpoint's result is reported
    assert main([*SMALL, "--stages", "2", "--epochs", "2", "--resume", "--run-dir", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs"] == 2


# -- checkpoints, one process per stage ----------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_per_stage_corrupt_and_crafted_checkpoints_are_refused(tmp_path):
    run = trained_run(tmp_path, nproc=2)
    resume = [*SMALL, "--nproc", "2", "--epochs", "3", "--resume", "--run-dir", str(run)]
    ckpt = run / "checkpoint-stage1-epoch2.pt"
    saved = tmp_path / "saved"
    shutil.copytree(run, saved)

    flip(ckpt)
    out = cli(resume)
    lines = error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and str(ckpt) in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "frame #" not in out.stderr

    witness = tmp_path / "pwned"
    craft(ckpt, witness)
    out = cli(resume)
    lines = error_lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and str(ckpt) in lines[0], out.stderr
    assert not witness.exists()
    assert (run / "metrics.jsonl").read_text() == (saved / "metrics.jsonl").read_text()


# -- a stage dies or freezes ---------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault, fragment", [("1:exit:3", "stage 1"), ("1:hang:3", "stage 1")])
def test_a_dead_or_frozen_stage_ends_the_run_in_one_line(tmp_path, fault, fragment):
    run = tmp_path / "run"
    out = cli([*SMALL, "--nproc", "2", "--epochs", "2", "--timeout", "4", "--run-dir", str(run)],
              env={"LAYERPIPE_FAULT": fault, "TMPDIR": str(tmp_path)})
    lines = error_lines(out.stderr)
    assert out.returncode != 0 and len(lines) == 1 and fragment in lines[0], out.stderr
    assert "frame #" not in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.glob("layerpipe-launch-*"))
    assert read_status(run)["status"] in ("failed", "running")  # never "complete"


# -- signals to the launcher ---------------------------------------------------------------------------------
def start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, list[int], Path]:
    run = tmp_path / "run"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "layerpipe", *SMALL, "--nproc", "2", "--epochs", "500",
                             "--run-dir", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_for(lambda: (read_status(run) or {}).get("status") == "running" or proc.poll() is not None, 90,
             "the run to start")
    assert proc.poll() is None, proc.communicate()
    kids = children_of(proc.pid)
    assert len(kids) == 2
    return proc, kids, run


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_the_launcher_leaves_no_process(tmp_path, sig):
    proc, kids, run = start_long_run(tmp_path)
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_gone(kids, 5) == [], "children outlived the launcher"
    assert proc.returncode != 0
    assert "frame #" not in err and "Traceback" not in err, err
    if sig != signal.SIGKILL:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and signal.Signals(sig).name in lines[0], err
        assert not list(tmp_path.glob("layerpipe-launch-*")), "temp folder left"
    assert (run / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigterm_to_compare_stops_its_workers(tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "layerpipe", "compare", "--model", "mlp", "--dataset", "digits",
                             "--samples", "300", "--epochs", "300", "--weights", "stash,ema", "--seeds", "0",
                             "--stages", "2", "--jobs", "2", "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: len(children_of(proc.pid)) >= 2 or proc.poll() is not None, 60, "the workers")
    time.sleep(3)  # the workers are training
    workers = children_of(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_gone(workers, 5) == []
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "SIGTERM" in lines[0], err


# -- interrupted runs, temp files --------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_an_interrupted_run_is_marked_and_keeps_the_good_save(tmp_path):
    from layerpipe.training import TrainConfig, train

    config = TrainConfig(model="mlp", dataset="digits", samples=300, epochs=3, stages="2", weights="stash")
    save = tmp_path / "good.pt"
    save.write_bytes(b"a good model")

    def stop(record):
        raise KeyboardInterrupt("SIGTERM")

    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir=tmp_path / "run", progress=False, save=save, on_epoch=stop)
    assert read_status(tmp_path / "run")["status"] == "interrupted"
    assert save.read_bytes() == b"a good model"


@pytest.mark.timeout(60)
def test_stale_temp_files_of_a_cut_write_are_cleaned(tmp_path, capsys):
    run = trained_run(tmp_path)
    stale = [run / ".layerpipe-tmp-checkpoint.json.abc123", run / ".layerpipe-tmp-checkpoint-stage0-epoch3.pt.x1"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert main([*SMALL, "--stages", "2", "--epochs", "3", "--resume", "--run-dir", str(run)]) == 0
    assert not any(p.exists() for p in stale)
    assert not list(run.glob(".layerpipe-tmp-*"))
