"""Learning-curve plots (matplotlib, Agg backend, imported lazily)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path


from layerpipe.errors import MissingExtra, require

__all__ = ["MissingExtra", "learning_curves", "run_curves"]


def _pyplot():
    matplotlib = require("matplotlib", "plots", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: str | os.PathLike,
    ylabel: str = "test accuracy",
) -> Path:
    """One panel per key of `panels`; in each, one line per strategy: the mean over runs
    (each a sequence of per-epoch values) with a band from min to max."""
    plt = _pyplot()
    import numpy as np

    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for label, runs in curves.items():
            length = min(len(r) for r in runs)
            arr = np.array([r[:length] for r in runs], dtype=float)
            epochs = np.arange(1, length + 1)
            ax.plot(epochs, arr.mean(0), label=label, marker="o", ms=3)
            if len(runs) > 1:
                ax.fill_between(epochs, arr.min(0), arr.max(0), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    return _save(plt, fig, path)


def run_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """One run's curves from its epoch records: training and validation loss (left), and
    validation accuracy (right), per epoch."""
    plt = _pyplot()

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3, label="training")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], marker="o", ms=3, label="validation")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_acc.plot(epochs, [100 * r["test_accuracy"] for r in history], marker="o", ms=3, color="C1", label="validation")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Lay out, write (making the folder) and close a figure; its path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
