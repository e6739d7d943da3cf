"""scikit-learn's 8x8 handwritten digits (1797 images, bundled with sklearn: no download).

    ds = load_digits(seed=0)       # 1437 train / 360 test, x (N, 64) float32, standardised

Pixels (0..16) are standardised with the training set's mean and standard deviation; the
80/20 split is a permutation drawn from `seed`.
"""
from __future__ import annotations

import numpy as np
import torch

from layerpipe.data.dataset import Dataset
from layerpipe.errors import DataError, MissingExtra


def load_digits(*, samples: int | None = None, seed: int = 0) -> Dataset:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise MissingExtra("the digits dataset needs scikit-learn, which is not installed: "
                           "pip install 'layerpipe[data]'") from None
    bunch = sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    if samples is not None:
        train = train[: int(samples)]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / max(float(std), 1e-6)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(np.ascontiguousarray(x[train])),
        y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test])),
        y_test=torch.from_numpy(y[test]),
        num_classes=10,
        input_shape=(64,),
        task="classification",
    )
