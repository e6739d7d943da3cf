"""The `Dataset` record every loader returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Dataset:
    """A dataset held in memory; x/y are CPU tensors, y int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    """Number of classes; 256 (the byte vocabulary) for the language task."""
    input_shape: tuple[int, ...]
    """One sample's shape, x_train.shape[1:]."""
    task: str
    """Either "classification" (y is (N,)) or "language" (y is (N, T), x shifted by one)."""

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"num_classes={self.num_classes}, task={self.task!r})"
        )
