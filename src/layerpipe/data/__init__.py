"""Datasets that work offline, as tensors in memory.

    from layerpipe.data import load_dataset, loss_fn
    ds = load_dataset("mnist1d")                  # generated locally, cached as .npz
    ds.x_train.shape, ds.num_classes, ds.task     # (4000, 40), 10, "classification"
    loss = loss_fn(ds.task)(model(x), y)

| name     | source                                         | x (one sample)       | classes |
|----------|------------------------------------------------|----------------------|---------|
| mnist1d  | `mnist1d.data.make_dataset` (no download)      | (40,) float32        | 10      |
| digits   | `sklearn.datasets.load_digits` (bundled)       | (64,) float32        | 10      |
| cifar10  | `cifar-10-batches-py` pickles under data_dir   | (3, 32, 32) float32  | 10      |
| cifar100 | `cifar-100-python` pickles (fine labels)       | (3, 32, 32) float32  | 100     |
| text     | this Python's standard library sources, bytes  | (seq_len,) int64     | 256     |

`samples` means, per dataset: mnist1d the total number generated (split 80/20, default
5000 -> 4000/1000); digits and cifar a cap on the training set (test set unchanged); text the
total number of windows (train + validation, default: a 2 MB corpus). For "language" tasks
y is x shifted by one byte, (N, T) next-byte targets.

Missing or corrupt data raises `layerpipe.errors.DataError` with one line that says what to do.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.nn import functional as F

from layerpipe.data.dataset import Dataset
from layerpipe.errors import DataError

log = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("mnist1d", "digits", "cifar10", "cifar100", "text")


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    samples: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    seq_len: int = 128,
) -> Dataset:
    """Load dataset `name` (one of DATASET_NAMES); deterministic for a given `seed`.

    data_dir: where the CIFAR folders are (default: env LAYERPIPE_DATA, else ./data).
    cache_dir: where generated data is cached (default: env LAYERPIPE_CACHE, else
    ~/.cache/layerpipe). seq_len: window length of the text dataset.
    """
    if samples is not None and samples < 1:
        raise DataError(f"samples must be a positive number, got {samples}")
    if name == "mnist1d":
        from layerpipe.data.mnist1d import load_mnist1d

        ds = load_mnist1d(samples=samples, seed=seed, cache_dir=cache_dir)
    elif name == "digits":
        from layerpipe.data.digits import load_digits

        ds = load_digits(samples=samples, seed=seed)
    elif name in ("cifar10", "cifar100"):
        from layerpipe.data.cifar import load_cifar

        ds = load_cifar(name, data_dir=data_dir, samples=samples, seed=seed)
    elif name == "text":
        from layerpipe.data.text import load_text

        ds = load_text(samples=samples, seq_len=seq_len)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    log.info("loaded %r", ds)
    return ds


def _cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def _flat_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # (B, T, V) logits against (B, T) targets: mean over all B*T positions
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def loss_fn(task: str | Dataset) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss for a task ("classification" or "language", or a Dataset): mean cross entropy.

    For "language" the (B, T, 256) logits are flattened to (B*T, 256)."""
    name = task.task if isinstance(task, Dataset) else task
    if name == "classification":
        return _cross_entropy
    if name == "language":
        return _flat_cross_entropy
    raise DataError(f"unknown task {name!r}; choose classification or language")


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of correct arg-max predictions (per position for the language task)."""
    return (output.argmax(-1) == target).float().mean().item()


__all__ = ["DATASET_NAMES", "Dataset", "accuracy", "load_dataset", "loss_fn"]


