"""Where a tick of the distributed runtime goes, per rank: the workload of distributed_throughput.py.

    .venv/bin/python benchmarks/distributed_profile.py                    # stash and ema, 2 processes
    .venv/bin/python benchmarks/distributed_profile.py --weights ema --torch-profile /tmp/prof

Each rank (one process per stage, one thread each, glibc malloc tuned as `--nproc` does)
runs the timed epoch of `distributed_throughput.py` (c) with its hot calls wrapped by a
timer that charges every call its own time, its callees' excluded:

  forward         `Stage.forward` (autograd forward, the saved-tensor hooks, the loss)
  backward        `Stage.backward` less the reconstruction (autograd backward)
  reconstruct     `strategy.backward_weights` (ema: the rebuild; stash: a lookup)
  history         `strategy.before_update` + `after_update` (ema: the average; stash: the copy)
  optimizer       `optimizer.step`
  recv wait       `Comm.wait`: blocked on a message (the neighbour is late, or transfer)
  send, post      `Comm.send` (isend) and `Comm.post_recv` (buffer + irecv)
  other           the rest of the tick: the worker's and the stage's Python, grad zeroing

`--torch-profile DIR` also writes a torch.profiler table of rank 0's ops (self CPU time).
`--single` instead times each stage's work in one process, one thread (CPU ms per tick,
interleaved rounds): plain training of the whole model, each stage's bare module (with and
without its optimizer step), and stage 0 through `Stage` with each weight strategy: what a
rank would cost with no communication at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import distributed_throughput as dt  # noqa: E402

PARTS = ("forward", "backward", "reconstruct", "history", "optimizer", "recv wait", "send", "post", "other")


class Timer:
    """Exclusive time per category: a call's time less its timed callees'."""

    def __init__(self) -> None:
        self.total = {p: 0.0 for p in PARTS}
        self.cpu = {p: 0.0 for p in PARTS}  # the compute thread's CPU time (time.thread_time)
        self.calls = {p: 0 for p in PARTS}
        self._stack: list[tuple[float, float]] = []  # (wall, cpu) spent in timed callees of each open call

    def wrap(self, obj, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            self._stack.append((0.0, 0.0))
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                inner_wall, inner_cpu = self._stack.pop()
                self.total[part] += wall - inner_wall
                self.cpu[part] += cpu - inner_cpu
                self.calls[part] += 1
                if self._stack:
                    w, c = self._stack[-1]
                    self._stack[-1] = (w + wall, c + cpu)

        setattr(obj, name, timed)


def thread_cpu_times() -> dict[int, float]:
    """CPU seconds of each thread of this process (Linux schedstat: nanoseconds on a CPU)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return out


def run_rank(cfg: dict, out: str) -> None:
    import torch
    import torch.nn.functional as F

    from layerpipe.engine.distributed import Comm, StageWorker, World
    from layerpipe.engine.single import resolve_strategy
    from layerpipe.plan import sequential_spec

    torch.set_num_threads(1)
    comm = Comm(World.from_env(), timeout=120)
    model = dt.make_model(cfg["width"], cfg["layers"])
    n, b = cfg["microbatches"], cfg["batch"]
    x, y = dt.make_data(n * b)
    strategy, schedule = resolve_strategy(cfg["weights"], "layerpipe")
    spec = sequential_spec(model, 2, schedule)
    worker = StageWorker(comm, model, spec, weights=strategy, optimizer=dt.optimizer, loss_fn=F.cross_entropy,
                         sample=x[:2])
    order = [torch.arange(i * b, (i + 1) * b) for i in range(n)]
    worker.run_epoch(x, y, order[: cfg["warmup"]])
    timer = Timer()
    stage = worker.stage
    timer.wrap(stage, "forward", "forward")
    timer.wrap(stage, "backward", "backward")
    timer.wrap(stage.strategy, "backward_weights", "reconstruct")
    timer.wrap(stage.strategy, "before_update", "history")
    timer.wrap(stage.strategy, "after_update", "history")
    if stage.optimizer is not None:
        timer.wrap(stage.optimizer, "step", "optimizer")
    timer.wrap(comm, "wait", "recv wait")
    timer.wrap(comm, "send", "send")
    timer.wrap(comm, "post_recv", "post")
    timer.wrap(worker, "run_epoch", "other")
    comm.barrier()
    prof = None
    if cfg.get("torch_profile") and comm.rank == cfg.get("profile_rank", 0):
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
    threads0 = thread_cpu_times()
    wait0 = dt.run_queue_wait()
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    worker.run_epoch(x, y, order)
    wall = time.perf_counter() - t0
    thread_cpu, process_cpu = time.thread_time() - c0, time.process_time() - p0
    threads1 = thread_cpu_times()
    names = {t.native_id: t.name for t in threading.enumerate()}
    per_thread = sorted(((threads1[tid] - threads0.get(tid, 0.0), names.get(tid, f"native {tid}"))
                         for tid in threads1 if tid != threading.main_thread().native_id), reverse=True)
    preempted = dt.run_queue_wait() - wait0
    if prof is not None:
        prof.__exit__(None, None, None)
        Path(cfg["torch_profile"]).mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        Path(cfg["torch_profile"], f"{cfg['weights']}-rank{comm.rank}.txt").write_text(table)
    comm.barrier()
    comm.close()
    ticks = worker.timing.length(n)
    Path(f"{out}.{os.environ['RANK']}").write_text(json.dumps(
        {"wall": wall, "ticks": ticks, "samples": n * b, "preempted": preempted, "thread_cpu": thread_cpu,
         "process_cpu": process_cpu,
         "threads": [(name, cpu) for cpu, name in per_thread if cpu > 0], "total": timer.total, "cpu": timer.cpu,
         "calls": timer.calls, "delay": worker.delays[worker.rank]}))


def measure(cfg: dict) -> list[dict]:
    from layerpipe.cli.launch import MALLOC_ENV, launch

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "prof.json")
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
        env.update({k: str(1 << 30) for k in MALLOC_ENV}, OMP_NUM_THREADS="1")
        result = launch([sys.executable, str(HERE), "--worker", json.dumps(cfg), out], 2, env=env,
                        threads_per_process=1, malloc_tuning=False)
        if result.returncode:
            raise SystemExit(result.message)
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]


def render(runs: dict[str, list[list[dict]]]) -> str:
    """Per strategy and rank: the median over repeats of ms per tick in each part."""
    lines = ["| weights | rank (delay) | samples/s | ms/tick | " + " | ".join(PARTS)
             + " | CPU ms/tick: compute thread, other threads | preempted |",
             "|---|---|---:|---:|" + "---:|" * len(PARTS) + "---:|---:|"]
    for w, reps in runs.items():
        for r in range(2):
            rows = [rep[r] for rep in reps]

            def med(vals):
                vals = sorted(vals)
                return vals[len(vals) // 2]

            per_tick = {p: med([row["total"][p] / row["ticks"] * 1e3 for row in rows]) for p in PARTS}
            cpu_tick = {p: med([row["cpu"][p] / row["ticks"] * 1e3 for row in rows]) for p in PARTS}
            tick = med([row["wall"] / row["ticks"] * 1e3 for row in rows])
            sps = med([row["samples"] / row["wall"] for row in rows])
            pre = max(row["preempted"] / row["wall"] for row in rows)
            main_cpu = med([row["thread_cpu"] / row["ticks"] * 1e3 for row in rows])
            side_cpu = med([(row["process_cpu"] - row["thread_cpu"]) / row["ticks"] * 1e3 for row in rows])
            lines.append(f"| {w} | {r} (d={rows[0]['delay']}) | {sps:.0f} | {tick:.2f} | "
                         + " | ".join(f"{per_tick[p]:.2f} ({cpu_tick[p]:.2f})" for p in PARTS) + f" | {main_cpu:.2f}, {side_cpu:.2f} | {100 * pre:.0f}% |")
    return "\n".join(lines)


def single_process(rounds: int, cfg: dict) -> str:
    """The `--single` table (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from layerpipe.engine.build import build_stages, sequential_modules
    from layerpipe.engine.single import resolve_strategy
    from layerpipe.plan import sequential_spec

    torch.set_num_threads(1)
    width, layers, b = cfg["width"], cfg["layers"], cfg["batch"]
    x, y = dt.make_data(64 * b)
    g = torch.randn(b, width)

    def batch(i):
        i %= 64
        return x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]

    def plain():
        model = dt.make_model(width, layers)
        opt = dt.optimizer(model.parameters())

        def tick(i):
            xb, yb = batch(i)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        return tick

    def bare(k, step):
        model = dt.make_model(width, layers)
        mod = sequential_modules(model, sequential_spec(model, 2, "layerpipe"))[k]
        opt = dt.optimizer(list(mod.parameters()))

        def tick(i):
            xb, yb = batch(i)
            if k == 0:
                mod(xb).backward(g)
            else:
                F.cross_entropy(mod(g.detach().requires_grad_()), yb).backward()
            if step:
                opt.step()
            opt.zero_grad(set_to_none=True)
        return tick

    def staged(weights):
        model = dt.make_model(width, layers)
        strategy, schedule = resolve_strategy(weights, "layerpipe")
        spec = sequential_spec(model, 2, schedule)
        (stage,) = build_stages(sequential_modules(model, spec), spec, strategy, dt.optimizer, F.cross_entropy,
                                None, only=0)
        d, t = spec.delays[0], [0]

        def tick(i):
            stage.forward(t[0], batch(i)[0])
            if t[0] >= d:
                stage.backward(t[0] - d, g)
                stage.update()
            t[0] += 1
        return tick

    variants = {"plain training, whole model": plain(), "stage 0 module + optimizer step": bare(0, True),
                "stage 0 module, no step": bare(0, False), "stage 1 module + loss + optimizer step": bare(1, True),
                "stage 1 module + loss, no step": bare(1, False)}
    variants.update({f"stage 0 through Stage, weights={w}": staged(w) for w in ("latest", "stash", "ema")})
    times: dict[str, list[float]] = {k: [] for k in variants}
    for tick in variants.values():
        for i in range(4):
            tick(i)
    for _ in range(rounds):
        for k, tick in variants.items():
            c0 = time.thread_time()
            for i in range(8):
                tick(i)
            times[k].append((time.thread_time() - c0) / 8 * 1e3)
    lines = ["| work (one process, one thread) | CPU ms per tick, median | min - max |", "|---|---:|---|"]
    for k, v in times.items():
        v = sorted(v)
        lines.append(f"| {k} | {v[len(v) // 2]:.2f} | {v[0]:.2f} - {v[-1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="stash,ema")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=48)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="rounds, strategies interleaved; medians shown")
    p.add_argument("--torch-profile", default=None, help="folder for torch.profiler op tables (rank --profile-rank)")
    p.add_argument("--profile-rank", type=int, default=0)
    p.add_argument("--single", action="store_true", help="time each stage's work in one process (no messages)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_rank(json.loads(args.worker[0]), args.worker[1])
        return 0
    if args.single:
        from layerpipe.cli.launch import MALLOC_ENV

        if any(os.environ.get(k) != str(1 << 30) for k in MALLOC_ENV):  # the ranks' allocator settings
            import subprocess

            env = dict(os.environ, OMP_NUM_THREADS="1", **{k: str(1 << 30) for k in MALLOC_ENV})
            return subprocess.run([sys.executable, str(HERE), *(sys.argv[1:] if argv is None else argv)],
                                  env=env).returncode
        print(single_process(2 * args.repeats, dict(width=args.width, layers=args.layers, batch=args.batch)))
        return 0
    base = dict(width=args.width, layers=args.layers, batch=args.batch, microbatches=args.microbatches,
                warmup=args.warmup, torch_profile=args.torch_profile, profile_rank=args.profile_rank)
    strategies = [w for w in args.weights.split(",") if w]
    runs: dict[str, list[list[dict]]] = {w: [] for w in strategies}
    for rep in range(args.repeats):
        for w in strategies:
            runs[w].append(measure(dict(base, weights=w)))
            print(f"round {rep + 1}: {w}: {runs[w][-1][0]['samples'] / runs[w][-1][0]['wall']:.0f} samples/s",
                  file=sys.stderr, flush=True)
    print("ms per tick, wall (CPU time of the compute thread): exclusive time of each part, median of the rounds\n")
    print(render(runs))
    print("\nCPU ms per tick of the other threads of each process, last round (gloo's I/O threads are unnamed):")
    for w, reps in runs.items():
        for r, row in enumerate(reps[-1]):
            print(f"- {w} rank {r}: " + ", ".join(f"{name} {cpu / row['ticks'] * 1e3:.2f}" for name, cpu in row["threads"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
