"""Views of a tick schedule: a text grid (stages by ticks) and a PNG chart.

    >>> from layerpipe.schedule.builder import build_schedule
    >>> print(format_grid(build_schedule(2, 2, "layerpipe"), 2))
    tick         0      1      2      3
    stage 0     F0     F1     B0     B1
    stage 1      .  F0 B0  F1 B1      .

matplotlib is imported only by `save_png`, and through its object API with the Agg canvas,
so it never opens a window nor touches pyplot's global state.
"""
from __future__ import annotations

from pathlib import Path

from layerpipe.schedule.actions import Action
from layerpipe.schedule.builder import TickSchedule, stage_rows


def _cell(acts: list[Action]) -> str:
    return " ".join(f"{a.kind}{a.microbatch}" for a in acts) or "."


def format_grid(ticks: TickSchedule, num_stages: int) -> str:
    """Rows are stages, columns ticks; a cell lists that stage's actions in that tick
    (`F5 B3`: forward of microbatch 5, then backward and update of microbatch 3)."""
    rows = stage_rows(ticks, num_stages)
    cells = {k: [_cell(acts) for acts in rows[k]] for k in rows}
    width = max([len(str(t)) for t in ticks] + [len(c) for row in cells.values() for c in row])
    label = len(f"stage {num_stages - 1}")
    lines = ["tick".ljust(label) + "".join(f"  {t:>{width}}" for t in ticks)]
    for k in range(num_stages):
        lines.append(f"stage {k}".ljust(label) + "".join(f"  {c:>{width}}" for c in cells[k]))
    return "\n".join(lines)


def save_png(ticks: TickSchedule, num_stages: int, path: str | Path, title: str | None = None) -> Path:
    """Draw the schedule: one row per stage, forwards in the upper half of a tick's box,
    backwards in the lower half, labelled with the microbatch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is slow to import
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n_ticks = len(ticks)
    fig = Figure(figsize=(max(4.0, 0.45 * n_ticks + 1.5), 0.6 * num_stages + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {"F": "#4c72b0", "B": "#dd8452"}
    for t, acts in ticks.items():
        for a in acts:
            # stage 0 on top, like the text grid; F above B inside a stage's row
            y = num_stages - 1 - a.stage + (0.5 if a.kind == "F" else 0.05)
            ax.add_patch(Rectangle((t, y), 1, 0.45, facecolor=colours[a.kind], edgecolor="white"))
            ax.text(t + 0.5, y + 0.225, str(a.microbatch), ha="center", va="center", fontsize=7, color="white")
    ax.set_xlim(0, n_ticks)
    ax.set_ylim(0, num_stages)
    ax.set_yticks([num_stages - 1 - k + 0.5 for k in range(num_stages)], [f"stage {k}" for k in range(num_stages)])
    ax.set_xticks([t + 0.5 for t in ticks], [str(t) for t in ticks], fontsize=7)
    ax.set_xlabel("tick (upper half: forward, lower half: backward + update; number: microbatch)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
