"""Sweeps over K and M, and their views: a text table and a PNG of throughput and bubble vs K.

    >>> from layerpipe.simulate.costs import StageCosts
    >>> rows = sweep(lambda k: StageCosts.uniform(k, forward=1.0, backward=2.0), [2, 4], [8], ["1f1b"])
    >>> [round(r.bubble, 4) for r in rows]                 # (K-1)/(M+K-1)
    [0.1111, 0.2727]

matplotlib is imported only by `save_png` (object API, Agg canvas, as schedule/view.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from layerpipe.simulate.costs import StageCosts
from layerpipe.simulate.schedules import ASYNC_SCHEDULES, SimResult, memory_strategy, simulate


def sweep(costs_for: Callable[[int], StageCosts], stages: Sequence[int], microbatches: Sequence[int],
          schedules: Sequence[str], accumulate: int = 1) -> list[SimResult]:
    """Every schedule at every K and M; `costs_for(K)` gives the costs of K stages;
    `accumulate`: the asynchronous schedules' microbatches per update."""
    out = []
    for k in stages:
        costs = costs_for(k)
        for m in microbatches:
            for s in schedules:
                out.append(simulate(costs, s, m, accumulate=accumulate))
    return out


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]], left: int) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in [header, *rows])


def render_table(results: Sequence[SimResult], weights: str, batch: int = 1, samples_factor: float = 1.0) -> str:
    """One row per schedule, K and M: throughput, its ratio to 1F1B, bubble, activations in
    flight on stage 0, and peak memory (the largest stage, and stage 0)."""
    unit = "samples/s" if batch > 1 else "microbatches/s"
    ref = {(r.num_stages, r.microbatches): r.throughput for r in results if r.schedule == "1f1b"}
    effective = samples_factor != 1.0
    header = ["schedule", "K", "M", unit, *(["effective"] if effective else []), "vs 1f1b", "bubble",
              "in flight st0", "peak mem (max stage)", "mem stage 0"]
    rows = []
    for r in results:
        key = memory_strategy(r, weights)
        tput = r.throughput * batch
        eff = tput / samples_factor if r.schedule in ASYNC_SCHEDULES else tput
        base = ref.get((r.num_stages, r.microbatches))
        every = f", A={r.accumulate}" if r.accumulate > 1 else ""
        name = f"{r.schedule} ({weights}{every})" if r.schedule in ASYNC_SCHEDULES else r.schedule
        rows.append([name, str(r.num_stages), str(r.microbatches), _num(tput), *([_num(eff)] if effective else []),
                     f"{(eff if effective else tput) / (base * batch):.2f}x" if base else "-",
                     f"{100 * r.bubble:.1f}%", str(r.in_flight[0]), fmt_bytes(r.peak_memory(key)),
                     fmt_bytes(r.memory[key][0])])
    notes = ["", "bubble: share of stage-time idle in steady state (asynchronous: fill and drain excluded; "
             "synchronous: per step, flush and update included).",
             f"memory: weights + optimizer state + activations x microbatches in flight + weight history "
             f"({weights} for the asynchronous schedules; none for the synchronous ones)."]
    if effective:
        notes.append(f"effective: asynchronous throughput / --samples-factor {samples_factor:g} (the extra samples "
                     "a delayed-gradient run needs to reach the same quality); 'vs 1f1b' compares effective values.")
    return _table(header, rows, left=1) + "\n" + "\n".join(notes)


def save_png(results: Sequence[SimResult], path: str | Path, batch: int = 1, title: str | None = None) -> Path:
    """Throughput and bubble against K (log2 axis), one line per schedule and M."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is slow to import
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_t, ax_b = fig.subplots(1, 2)
    series: dict[tuple[str, int], list[SimResult]] = {}
    for r in results:
        series.setdefault((r.schedule, r.microbatches), []).append(r)
    styles = ["-", "--", ":", "-."]
    ms = sorted({m for _, m in series})
    for (sched, m), rs in series.items():
        rs = sorted(rs, key=lambda r: r.num_stages)
        ks = [r.num_stages for r in rs]
        label = sched if len(ms) == 1 else f"{sched}, M={m}"
        style = styles[ms.index(m) % len(styles)]
        line, = ax_t.plot(ks, [r.throughput * batch for r in rs], style, marker="o", label=label)
        ax_b.plot(ks, [100 * r.bubble for r in rs], style, marker="o", color=line.get_color(), label=label)
    for ax in (ax_t, ax_b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stages K")
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("samples/s" if batch > 1 else "microbatches/s")
    ax_t.set_title("throughput (steady state)")
    ax_b.set_ylabel("bubble (% of stage-time idle)")
    ax_b.set_title("bubble")
    ax_b.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
