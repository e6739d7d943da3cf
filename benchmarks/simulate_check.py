"""Validate `layerpipe simulate` against measurement: predicted vs measured throughput of the
2-stage distributed runtime and torch's Schedule1F1B (the workload of distributed_throughput.py).

    PYTHONPATH=src .venv/bin/python benchmarks/simulate_check.py                  # vs the recorded file
    PYTHONPATH=src .venv/bin/python benchmarks/simulate_check.py --run-benchmark  # + one fresh short run

1. Measures each stage of the benchmark's model (MLP 256 -> 1024 x 8 -> 10, split as the
   runtime splits it, microbatch 128, fused SGD momentum) alone on one thread in this process:
   forward, whole backward and its weight-gradient part, optimizer step, the extra work of
   the weight strategy per update (the library's own `stash` and `ema` objects, timed around
   an update without the optimizer step: `strategy_update`), on stages with d_k > 0,
   and the boundary copy (a lower bound for the gloo transfer).
2. Feeds them to the simulator: `layerpipe` schedule with an update per microbatch, one
   epoch of 48 microbatches from an empty pipeline to the drained end (what the benchmark's
   (c) rows time), and the same with one update per 8 microbatches (the (c, A=8) rows; the
   strategy's extra work per update as measured, though `ema` there rebuilds over one update,
   a copy); `1f1b` with one optimizer step per M microbatches, steady steps (the (d) rows
   time whole steps).
3. Prints predicted vs measured side by side: the measured rows of
   benchmarks/results/distributed-2026-11-28.md, and with --run-benchmark those of one fresh
   `distributed_throughput.py --rounds 1` run (minutes; both cores).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDED = HERE / "results" / "distributed-2026-11-28.md"


def _bench():
    spec = importlib.util.spec_from_file_location("distributed_throughput", HERE / "distributed_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _run_queue_wait() -> float:
    """Seconds this thread waited for a CPU (Linux schedstat; 0 where missing)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _median(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(width: int, layers: int, batch: int, repeats: int):
    """Per-stage StageCosts of the benchmark's 2-stage split, and the weight strategies'
    extra seconds per update on each stage."""
    import torch

    from layerpipe.simulate.profile import profile_slices

    torch.set_num_threads(1)
    b = _bench()
    model = b.make_model(width, layers)
    sizes = b.two_stage_split(model)
    slices = [model[: sizes[0]], model[sizes[0]:]]
    x, _ = b.make_data(batch)
    costs = profile_slices(slices, x, optimizer=b.optimizer, repeats=repeats, warmup=3, threads=1,
                           meta={"model": f"MLP {width}x{layers}", "batch": batch, "partition": sizes})
    # (a) of the benchmark, in this process now: plain training of the whole model per microbatch
    import torch.nn.functional as F

    whole = b.make_model(width, layers)
    opt = b.optimizer(whole.parameters())
    xb, yb = b.make_data(batch)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(whole(xb), yb).backward()
        opt.step()

    costs.meta["plain_seconds"] = _median(plain, repeats)
    extra = {"stash": [], "ema": []}
    for s in slices:
        for name in extra:
            extra[name].append(_median(strategy_update(name, list(s.parameters())), repeats))
    return costs, extra


def strategy_update(name: str, params: list) -> Callable[[], None]:
    """One update's bookkeeping of the library's own weight strategy `name` on a stage with
    delay 2, without the optimizer step, in the pipeline's steady state: record a forward,
    give the backward of the forward 2 updates back its weights and release them, wrap the
    step (stash: a copy into a reused buffer; ema: its two in-place passes, the backward
    reading the buffer), what the runtime adds per update."""
    from collections import deque

    from layerpipe.weights import strategy_class

    delay = 2
    strategy = strategy_class(name)(params, delay)
    pending: deque[int] = deque()

    def one() -> None:
        pending.append(strategy.record_forward())
        if len(pending) > delay:  # the backward of the forward `delay` ticks back
            version = pending.popleft()
            strategy.backward_weights(version)
            strategy.release(version)
        strategy.before_update()
        strategy.after_update()

    for _ in range(delay + 3):  # past the start (ema's first update only initialises its average)
        one()
    return one


def recorded(path: Path) -> dict[str, dict[str, float]]:
    """{block: {row key: samples/s}} from a distributed-*.md results file."""
    out: dict[str, dict[str, float]] = {}
    block = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            block = "malloc-tuned" if "tuned" in line else "glibc"
            out[block] = {}
        if block and line.startswith("| (a) plain training, 1 thread |"):
            out[block]["a1"] = float(line.split("|")[2].replace("!", ""))  # "!": no clean round
        m = re.match(r"\| \((c|d|c, A=\d+)\) (.*?) \| ([0-9.]+)", line)
        if m and block:
            label, kind = m.group(2), m.group(1)
            if kind == "d":
                key = f"d-M{label.split('M=')[1]}"
            else:  # "weights=ema" or "weights=ema, one update per 8 microbatches"
                key = f"{'c' if kind == 'c' else 'cA'}-{label.split('weights=')[1].split(',')[0]}"
            out[block][key] = float(m.group(3))
    return out


def run_benchmark() -> dict[str, dict[str, float]]:
    """One short run of the real benchmark (both cores, a few minutes): --rounds 1, stash and
    ema, both malloc settings; parsed the same way as the recorded file."""
    cmd = [sys.executable, str(HERE / "distributed_throughput.py"), "--rounds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    tmp = Path("/tmp") / f"simulate_check_{int(time.time())}.md"
    tmp.write_text(proc.stdout)
    print(f"benchmark output saved to {tmp}", file=sys.stderr)
    return recorded(tmp)


def predict(costs, extra: dict[str, list[float]], microbatches: int, batch: int) -> dict[str, float]:
    import dataclasses

    from layerpipe.plan.delays import stage_delays
    from layerpipe.simulate import simulate

    out = {}
    delays = stage_delays(costs.num_stages, "layerpipe")
    for w in ("stash", "ema"):
        upd = tuple(u + (e if d > 0 else 0.0) for u, e, d in zip(costs.update, extra[w], delays))
        c = dataclasses.replace(costs, update=upd)
        out[f"c-{w}"] = simulate(c, "layerpipe", microbatches).epoch_throughput * batch
        # one update per 8 microbatches (distributed_throughput's (c, A=8) rows)
        out[f"cA-{w}"] = simulate(c, "layerpipe", microbatches, accumulate=8).epoch_throughput * batch
    for m in (4, 8):
        out[f"d-M{m}"] = simulate(costs, "1f1b", m).throughput * batch
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=48, help="microbatches per timed epoch of (c) (default 48)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per stage measurement (median)")
    p.add_argument("--transfer", type=float, help="seconds per boundary transfer (default: the measured copy)")
    p.add_argument("--measured", metavar="FILE", action="append", default=[],
                   help="also compare with this distributed_throughput.py output (markdown); repeatable")
    p.add_argument("--run-benchmark", action="store_true",
                   help="also run distributed_throughput.py --rounds 1 once (minutes, both cores)")
    args = p.parse_args(argv)
    import dataclasses

    wait0, t0 = _run_queue_wait(), time.perf_counter()
    costs, extra = measure(args.width, args.layers, args.batch, args.repeats)
    preempted = (_run_queue_wait() - wait0) / (time.perf_counter() - t0)
    if args.transfer is not None:
        costs = dataclasses.replace(costs, transfer=(args.transfer,) * (costs.num_stages - 1))
    ms = lambda v: f"{1e3 * v:.2f}"  # noqa: E731
    print(f"# simulate_check: MLP 256 -> {args.width} x {args.layers} -> 10, microbatch {args.batch}, "
          f"split {costs.meta['partition']}, one thread per stage\n")
    print("| stage | F ms | B (input grad) ms | W (weight grad) ms | U ms | stash +ms | ema +ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in range(costs.num_stages):
        print(f"| {k} | {ms(costs.forward[k])} | {ms(costs.backward_input[k])} | {ms(costs.backward_weight[k])} | "
              f"{ms(costs.update[k])} | {ms(extra['stash'][k])} | {ms(extra['ema'][k])} |")
    plain_sps = args.batch / costs.meta["plain_seconds"]
    print(f"\ntransfer (boundary copy) {1e3 * costs.transfer[0]:.3f} ms; (a) plain training measured here: "
          f"{1e3 * costs.meta['plain_seconds']:.2f} ms per microbatch = {plain_sps:.0f} samples/s; "
          f"this process waited for a CPU {100 * preempted:.0f}% of the measuring time (other processes)\n")
    pred = predict(costs, extra, args.microbatches, args.batch)
    sources = {f"recorded {RECORDED.name} ({blk})": rows for blk, rows in recorded(RECORDED).items()}
    for path in args.measured:
        sources.update({f"{Path(path).name} ({blk})": rows for blk, rows in recorded(Path(path)).items()})
    if args.run_benchmark:
        sources.update({f"fresh run --rounds 1 ({blk})": rows for blk, rows in run_benchmark().items()})
    labels = {"c-stash": "(c) layerpipe runtime, 2 processes, stash", "c-ema": "(c) layerpipe runtime, 2 processes, ema",
              "cA-stash": "(c, A=8) the same, one update per 8 microbatches, stash",
              "cA-ema": "(c, A=8) the same, one update per 8 microbatches, ema",
              "d-M4": "(d) torch Schedule1F1B, M=4", "d-M8": "(d) torch Schedule1F1B, M=8"}
    for name, rows in sources.items():
        print(f"## predicted vs measured: {name}\n")
        print("| configuration | predicted samples/s | measured samples/s | predicted / measured | "
              "predicted / (a) here | measured / (a) there | ratio of ratios |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for key, label in labels.items():
            if key in rows:
                pr, mr = pred[key] / plain_sps, rows[key] / rows["a1"]
                print(f"| {label} | {pred[key]:.0f} | {rows[key]:.0f} | {pred[key] / rows[key]:.2f} | "
                      f"{pr:.2f}x | {mr:.2f}x | {pr / mr:.2f} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
