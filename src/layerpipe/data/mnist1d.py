"""MNIST-1D (Greydanus 2020), generated locally with the `mnist1d` package, never downloaded.

    ds = load_mnist1d(samples=5000, seed=0)      # 4000 train / 1000 test, x (N, 40) float32

The generator is the package's own `make_dataset` with its default arguments except
`num_samples` and `seed`; it takes about 1.5 s per 5000 samples, so the arrays are cached
as `mnist1d-n{samples}-seed{seed}-v1.npz` in the cache directory.
"""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from layerpipe.data._cache import cache_root, read_npz, write_npz_atomic
from layerpipe.data.dataset import Dataset
from layerpipe.errors import DataError, MissingExtra

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 5000
_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _generate(samples: int, seed: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise MissingExtra("the mnist1d dataset needs the mnist1d package, which is not installed: "
                           "pip install 'layerpipe[data]'") from None
    args = get_dataset_args()
    args.num_samples = samples
    args.seed = seed
    # make_dataset reseeds the global `random` and numpy generators: put them back after
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x_train": np.asarray(d["x"], dtype=np.float32),
        "y_train": np.asarray(d["y"], dtype=np.int64),
        "x_test": np.asarray(d["x_test"], dtype=np.float32),
        "y_test": np.asarray(d["y_test"], dtype=np.int64),
    }


def load_mnist1d(*, samples: int | None = None, seed: int = 0, cache_dir: str | None = None) -> Dataset:
    n = DEFAULT_SAMPLES if samples is None else int(samples)
    if n < 10:
        raise DataError(f"MNIST-1D needs at least 10 samples (one per class), got {n}")
    path = cache_root(cache_dir) / f"mnist1d-n{n}-seed{seed}-v1.npz"
    arrays = read_npz(path)
    if arrays is None or any(k not in arrays for k in _KEYS):
        log.info("generating MNIST-1D: %d samples, seed %d", n, seed)
        arrays = _generate(n, seed)
        write_npz_atomic(path, arrays)
    else:
        log.debug("MNIST-1D from cache %s", path)
    t = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in _KEYS}
    return Dataset(
        name="mnist1d",
        num_classes=10,
        input_shape=tuple(t["x_train"].shape[1:]),
        task="classification",
        **t,
    )
