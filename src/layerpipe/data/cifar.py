"""CIFAR-10 / CIFAR-100 from the standard python-pickle folders (no torchvision).

    ds = load_cifar("cifar10", data_dir="data")     # data/cifar-10-batches-py/data_batch_1..5, test_batch
    ds = load_cifar("cifar100", data_dir="data")    # data/cifar-100-python/train, test (fine labels)

`data_dir` may be the folder's parent or the folder itself. Images become float32
(N, 3, 32, 32), normalised per channel with the usual training-set mean and std. `samples`
keeps a seeded random subset of the training set (the test set stays whole).

The files are pickles. They are read with an unpickler that only builds numpy arrays, lists
and dicts, so a tampered file is reported as corrupt instead of running code.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerpipe.data.dataset import Dataset
from layerpipe.errors import DataError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Layout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    classes: int
    mean: tuple[float, float, float]  # per-channel statistics of the training set
    std: tuple[float, float, float]
    archive: str


_LAYOUTS = {
    "cifar10": _Layout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "cifar-10-python.tar.gz",
    ),
    "cifar100": _Layout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "cifar-100-python.tar.gz",
    ),
}

# the only globals a CIFAR pickle needs: numpy's array reconstruction
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 moved it
        return super().find_class(module, name)


def _default_data_dir() -> Path:
    return Path(os.environ.get("LAYERPIPE_DATA") or "data")


def _find_folder(data_dir: Path, folder: str, first_file: str) -> Path:
    """The CIFAR folder: data_dir/folder, or data_dir itself when it holds the files."""
    if (data_dir / folder / first_file).is_file():
        return data_dir / folder
    if (data_dir / first_file).is_file():
        return data_dir
    return data_dir if data_dir.name == folder else data_dir / folder


def _read_batch(path: Path, title: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        if not isinstance(batch, dict):
            raise ValueError("not a dict")
        batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"no 'data' or {label_key.decode()!r} entry")
        x = np.asarray(batch[b"data"], dtype=np.uint8)
        y = np.asarray(batch[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],):
            raise ValueError(f"data {x.shape} and labels {y.shape} are not (N, 3072) and (N,)")
    except OSError as exc:
        raise DataError(f"{title}: cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # pickle, EOF, type and shape errors: all mean a broken file
        raise DataError(
            f"{title} file is corrupt: {path} ({type(exc).__name__}: {exc}); extract the archive again"
        ) from None
    return x, y


def load_cifar(
    name: str, *, data_dir: str | os.PathLike[str] | None = None, samples: int | None = None, seed: int = 0
) -> Dataset:
    """Load "cifar10" or "cifar100"; DataError names the first missing or corrupt file."""
    lay = _LAYOUTS[name]
    title, train_files, test_files, classes = lay.title, lay.train_files, lay.test_files, lay.classes
    root = (Path(data_dir).expanduser() if data_dir is not None else _default_data_dir()).absolute()
    where = _find_folder(root, lay.folder, train_files[0])
    for fname in (*train_files, *test_files):
        if not (where / fname).is_file():
            raise DataError(
                f"{title} not found: expected {where / fname} "
                f"(download {lay.archive} and extract it under --data-dir)"
            )

    def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_batch(where / f, title, lay.label_key) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    for y, split in ((y_train, "train"), (y_test, "test")):
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise DataError(f"{title} file is corrupt: {split} labels outside 0..{classes - 1} in {where}")
    if samples is not None and samples < len(y_train):
        keep = np.sort(np.random.default_rng(seed).permutation(len(y_train))[: int(samples)])
        x_train, y_train = x_train[keep], y_train[keep]
    log.info("%s from %s: %d train, %d test", title, where, len(y_train), len(y_test))
    return Dataset(
        name=name,
        x_train=_normalise(x_train, lay.mean, lay.std),
        y_train=torch.from_numpy(y_train),
        x_test=_normalise(x_test, lay.mean, lay.std),
        y_test=torch.from_numpy(y_test),
        num_classes=classes,
        input_shape=(3, 32, 32),
        task="classification",
    )


def _normalise(x: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """(N, 3072) uint8 -> (N, 3, 32, 32) float32, (x / 255 - mean) / std per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x)).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return t.sub_(m).div_(s)
