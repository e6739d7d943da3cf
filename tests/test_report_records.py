"""Atomic writes of results, checkpoints and metrics (layerpipe.report.records)."""
from __future__ import annotations

import os

import pytest

from layerpipe.report import records
from layerpipe.report.records import atomic_write_bytes


def test_atomic_write_replaces_content_and_honours_the_umask(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    target.write_bytes(b"good")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"half-written")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
