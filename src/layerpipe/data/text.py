"""A byte-level language-modelling corpus from this Python's standard library sources.

    ds = load_text(seq_len=128)      # about 2 MB: x (N, 128) int64 bytes, y = x shifted by one

The corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]` (third-party
`site-packages` excluded), sorted by relative path, read as bytes and concatenated until
the byte budget is reached: deterministic for one Python installation. The first 90% of the
windows train, the rest (later positions, other files) validate. Windows do not overlap:
window i is bytes [i*T, i*T + T) and its targets bytes [i*T + 1, i*T + T + 1).
"""
from __future__ import annotations

import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from layerpipe.data.dataset import Dataset
from layerpipe.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_BYTES = 2 * 1024 * 1024
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_sources(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The standard library's *.py files, sorted by path relative to `root`."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(base)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return [base / p for p in sorted(found)]


def read_corpus(num_bytes: int, root: str | os.PathLike[str] | None = None) -> bytes:
    """The first `num_bytes` of the concatenated sources (fewer if the library is smaller)."""
    chunks, total = [], 0
    for path in stdlib_sources(root):
        try:
            data = path.read_bytes()
        except OSError as exc:  # an unreadable file is skipped, the rest is still deterministic
            log.warning("skipping %s (%s)", path, exc)
            continue
        chunks.append(data)
        total += len(data)
        if total >= num_bytes:
            break
    return b"".join(chunks)[:num_bytes]


def _windows(data: torch.Tensor, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1 : n * seq_len + 1].view(n, seq_len)
    return x.clone(), y.clone()


def load_text(*, samples: int | None = None, seq_len: int = 128, root: str | os.PathLike[str] | None = None) -> Dataset:
    """`samples` windows in all (default: as many as DEFAULT_BYTES hold), 90% train / 10% validation."""
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    n_total = int(samples) if samples is not None else (DEFAULT_BYTES - 1) // seq_len
    corpus = read_corpus(n_total * seq_len + 1, root)
    if len(corpus) < n_total * seq_len + 1:
        available = max(0, len(corpus) - 1) // seq_len
        log.warning("the standard library holds %d bytes: %d windows instead of %d", len(corpus), available, n_total)
        n_total = available
    if n_total < 2:
        where = root if root is not None else sysconfig.get_paths()["stdlib"]
        raise DataError(
            f"text corpus too small: {len(corpus)} bytes of *.py sources under {where}, "
            f"need at least {2 * seq_len + 1} for seq_len {seq_len}"
        )
    n_val = max(1, n_total // 10)
    n_train = n_total - n_val
    data = torch.from_numpy(np.frombuffer(corpus, dtype=np.uint8).astype(np.int64))
    split = n_train * seq_len  # validation inputs start where the training inputs end
    x_train, y_train = _windows(data[: split + 1], n_train, seq_len)
    x_test, y_test = _windows(data[split:], n_val, seq_len)
    return Dataset(
        name="text",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=256,
        input_shape=(seq_len,),
        task="language",
    )
