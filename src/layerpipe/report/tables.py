"""Markdown tables of comparison results."""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """rows: {"stages", "delays", "microbatch", "weights", "accuracies": [...], "losses": [...],
    "history_x": float, "seconds_per_epoch": float}."""
    lines = [
        "| stages | delays | microbatch | weights | test accuracy % (mean ± sd) | min - max | test loss (mean ± sd) "
        "| runs | weight history / \\|W\\| | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accs = [100 * a for a in r["accuracies"]]
        mean, sd = mean_spread(accs)
        loss, loss_sd = mean_spread(r["losses"])
        lines.append(
            f"| {r['stages']} | {r['delays']} | {r['microbatch']} | {r['weights']} | {mean:.2f} ± {sd:.2f} "
            f"| {min(accs):.2f} - {max(accs):.2f} | {loss:.4f} ± {loss_sd:.4f} | {len(accs)} | {r['history_x']:.2f} "
            f"| {r['seconds_per_epoch']:.2f} |"
        )
    return "\n".join(lines)
