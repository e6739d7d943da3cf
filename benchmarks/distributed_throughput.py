"""Throughput of the distributed runtime against plain training and torch's own 1F1B pipeline.

    .venv/bin/python benchmarks/distributed_throughput.py                 # the recorded run
    .venv/bin/python benchmarks/distributed_throughput.py --quick         # a short smoke run
    .venv/bin/python benchmarks/distributed_throughput.py --save          # + benchmarks/results/distributed-<date>.md

Side by side in one run, each measurement in a fresh process (or two), every worker on one
thread (`torch.set_num_threads(1)`): the CPU stand-in for one device per stage. One model, one
microbatch size, samples per second of

  (a) plain PyTorch training (forward, backward, SGD step per microbatch), 1 thread; and,
      for the record, 2 threads
  (b) the single-process layerpipe engine (`Pipeline`, 2 stages), 1 thread
  (c) the distributed runtime, 2 processes (`--nproc 2`): `StageWorker` over gloo
  (d) `torch.distributed.pipelining` `PipelineStage` + `Schedule1F1B`, 2 processes, gloo, the
      same two stages and microbatch size, M = 4 and 8 microbatches per step (a flush per
      step: bubble (K-1)/(M+K-1))
  (c, A) as (c), with one update per A microbatches (`accumulate:every=A`, default A = 8):
      the samples per update, and so the optimizer's work, of (d) at M = 8; like for like
      with it, where (c) makes 8 times its updates

With `--dp-only`: data parallelism x pipelining side by side with plain training, K x R = 2
processes: (c) K=2 stages x R=1 (the pipeline), (e) K=1 stage x R=2 replicas (data parallel
only: each replica takes b samples of a global microbatch of 2b, gradients all-reduced over
gloo before every update), against (a) plain training on one core and (a) x 2.

Rounds interleave the measurements (a b c d, a b c d, ...), so that drift hits every row
alike. The machine may be shared: each worker also records how long its compute thread sat
ready to run but off the CPU (Linux schedstat), and the table uses the clean rounds only (at
most 5% of the timed window); `--clean N` keeps going until every row has N of them. (c) counts whole epochs, the drain of
2 ticks included; (d) whole steps, flush included; (a) and (b) whole epochs too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
#: a measurement is clean when no worker's compute thread waited for a CPU longer than this
#: share of the timed window (other processes on the machine took it)
CLEAN = 0.05
#: issue 15's targets for (c): against plain 1-thread training, torch's 1F1B at M=8, and ema against stash
TARGET_PLAIN, TARGET_1F1B, TARGET_EMA = 1.85, 1.08, 0.97
ROOT = HERE.parent.parent


# -- the workload ----------------------------------------------------------------------------------
def make_model(width: int, layers: int, in_features: int = 256, classes: int = 10):
    import torch
    from torch import nn

    torch.manual_seed(0)
    mods = [nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods += [nn.Linear(width, classes)]
    return nn.Sequential(*mods)


def make_data(n: int, in_features: int = 256, classes: int = 10):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randn(n, in_features, generator=g), torch.randint(0, classes, (n,), generator=g)


def optimizer(params):
    """SGD with momentum, the fused kernel (the same algorithm, about half the time of the
    default per-tensor loop on this CPU), for every row alike."""
    import torch

    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)


def weights_and_schedule(cfg: dict) -> tuple[str, str]:
    """"ema" -> ("ema", "layerpipe"); "ema@pipedream" -> ("ema", "pipedream"): the 1F1B timing.
    A "+fused" suffix ("ema+fused") is `fused_update` (see `fused`)."""
    weights, _, schedule = cfg["weights"].removesuffix("+fused").partition("@")
    return weights, schedule or "layerpipe"


def fused(cfg: dict) -> bool:
    """"ema+fused": each stage's update as one compiled loop per tensor (`fused_update=True`)."""
    return cfg["weights"].endswith("+fused")


def two_stage_split(model) -> list[int]:
    """The layers per stage that (c) uses (`sequential_spec`: balanced by parameter count)."""
    from layerpipe.plan import sequential_spec

    return list(sequential_spec(model, 2, "layerpipe").stage_sizes)


# -- workers (each in its own process) -----------------------------------------------------------------
def run_plain(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg["threads"])
    model = make_model(cfg["width"], cfg["layers"])
    opt = optimizer(model.parameters())
    n, b = cfg["microbatches"], cfg["batch"]
    x, y = make_data(n * b)

    def epoch(count: int) -> None:
        for i in range(count):
            xb, yb = x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()

    epoch(cfg["warmup"])
    clock = Clock()
    epoch(n)
    return clock.result(n * b)


def run_engine(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from layerpipe import Pipeline

    torch.set_num_threads(1)
    model = make_model(cfg["width"], cfg["layers"])
    weights, schedule = weights_and_schedule(cfg)
    pipe = Pipeline(model, stages=2, weights=weights, optimizer=optimizer, loss_fn=F.cross_entropy, schedule=schedule,
                    fused_update=fused(cfg))
    n, b = cfg["microbatches"], cfg["batch"]
    x, y = make_data(n * b)

    def epoch(count: int) -> None:
        for i in range(count):
            pipe.step(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b])
        pipe.flush()

    epoch(cfg["warmup"])
    clock = Clock()
    epoch(n)
    if fused(cfg) and any(s.fused is not None and s.fused.fused_steps < n for s in pipe.stages):
        raise RuntimeError(f"{cfg['weights']}: a stage's updates did not fuse")
    return clock.result(n * b)


def run_distributed(cfg: dict) -> dict | None:
    import torch
    import torch.nn.functional as F

    from layerpipe.engine.distributed import Comm, StageWorker, World
    from layerpipe.engine.single import resolve_strategy
    from layerpipe.plan import sequential_spec

    torch.set_num_threads(1)
    pp, dp = cfg.get("pp", 2), cfg.get("dp", 1)
    comm = Comm(World.from_env(), timeout=120, dp=dp)
    model = make_model(cfg["width"], cfg["layers"])
    n, b = cfg["microbatches"], cfg["batch"] * dp  # global microbatches of R x b
    x, y = make_data(n * b)
    strategy, schedule = resolve_strategy(*weights_and_schedule(cfg))
    every = cfg.get("accumulate", 0)
    worker = StageWorker(comm, model, sequential_spec(model, pp, schedule), weights=strategy, optimizer=optimizer,
                         loss_fn=F.cross_entropy, sample=x[:2],
                         compensation=[f"accumulate:every={every}"] if every > 1 else None, fused_update=fused(cfg))
    order = [torch.arange(i * b, (i + 1) * b) for i in range(n)]
    worker.run_epoch(x, y, order[: cfg["warmup"]])
    comm.barrier()
    clock = Clock()
    worker.run_epoch(x, y, order)  # stage 0 applies the epoch's last gradient: it ends last
    result = clock.result(n * b)
    if fused(cfg) and worker.stage.fused is not None and worker.stage.fused.fused_steps < n:
        raise RuntimeError(f"{cfg['weights']}: the stage's updates did not fuse ({worker.stage.fused.fused_steps})")
    comm.close()
    return result


def run_pippy(cfg: dict) -> dict | None:
    import datetime

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.set_num_threads(1)
    if os.environ.get("LAYERPIPE_STORE_HOSTED") == "1":  # our launcher hosts the store, as torchrun's agent would
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    model = make_model(cfg["width"], cfg["layers"])
    sizes = two_stage_split(model)
    a = sum(sizes[:rank])
    module = model[a:a + sizes[rank]]
    opt = optimizer(module.parameters())
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    m, b = cfg["pippy_m"], cfg["batch"]
    schedule = Schedule1F1B(stage, n_microbatches=m, loss_fn=F.cross_entropy)
    steps = max(1, cfg["microbatches"] // m)
    x, y = make_data(steps * m * b)

    def step(i: int) -> None:
        xb, yb = x[i * m * b:(i + 1) * m * b], y[i * m * b:(i + 1) * m * b]
        if rank == 0:
            schedule.step(xb)
        else:
            schedule.step(target=yb, losses=[])
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(max(1, cfg["warmup"] // m)):
        step(i % steps)
    dist.barrier()
    clock = Clock()
    for i in range(steps):
        step(i)
    dist.barrier()  # the last stage's step ends after stage 0's: wait for both
    result = clock.result(steps * m * b)
    dist.destroy_process_group()
    return result


def run_plain_pair(cfg: dict) -> dict:
    """Plain training in each of two independent processes at once: what two cores give
    when nothing is shared but the memory system (the practical ceiling of 2 stages)."""
    return run_plain(cfg)


WORKERS = {"plain": run_plain, "plain2": run_plain_pair, "engine": run_engine, "distributed": run_distributed,
           "pippy": run_pippy}


def machine_line(env: dict) -> str:
    """The CPU model, core count, whether a hypervisor is seen, and the load when the run began."""
    model, virtual = env["processor"], False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == env["processor"]:
                    model = f"{line.split(':', 1)[1].strip()} ({env['processor']})"
                elif line.startswith("flags"):
                    virtual = " hypervisor" in line
                    break
    except OSError:
        pass
    return (f"{model}, {env['cpus']} CPUs{' (virtual machine)' if virtual else ''}; load average "
            f"{LOAD_AT_START[0]:.2f} when the run began (other processes on the machine slow every row)")


LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def run_queue_wait() -> float:
    """Seconds the compute thread has spent ready to run but waiting for a CPU (Linux
    schedstat): the time other processes took from it. 0 where schedstat is missing."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class Clock:
    """The timed window of a worker: wall seconds, and how long its compute thread waited
    for a CPU in it (waiting for a message is not counted: the thread sleeps then)."""

    def __init__(self) -> None:
        self.p0, self.w0 = time.perf_counter(), run_queue_wait()

    def result(self, samples: int) -> dict:
        return {"samples": samples, "seconds": time.perf_counter() - self.p0, "preempted": run_queue_wait() - self.w0}


def worker_main(kind: str, cfg_json: str, out: str) -> None:
    result = WORKERS[kind](json.loads(cfg_json))
    Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(json.dumps(result))


# -- the driver ------------------------------------------------------------------------------------------
def measure(kind: str, cfg: dict, nproc: int = 1) -> tuple[float, float]:
    """(samples per second, largest share of the timed window a worker's compute thread
    spent waiting for a CPU) of one measurement, in fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE), "--worker", kind, json.dumps(cfg), str(out)]
        # every row runs with the same allocator settings: glibc's defaults, or the launcher's
        from layerpipe.cli.launch import MALLOC_ENV, launch

        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
        env["OMP_NUM_THREADS"] = str(cfg.get("threads", 1))
        if cfg.get("malloc"):
            env.update({k: str(1 << 30) for k in MALLOC_ENV})
        if nproc == 1:
            subprocess.run(cmd, check=True, env=env)
        else:
            result = launch(cmd, nproc, env=env, threads_per_process=1, malloc_tuning=False)
            if result.returncode:
                raise SystemExit(f"{kind}: {result.message}")
        rs = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]
    if kind == "plain2":  # two independent runs: their throughputs add up
        sps = sum(r["samples"] / r["seconds"] for r in rs)
    else:
        sps = rs[0]["samples"] / rs[0]["seconds"]
    return sps, max(r["preempted"] / r["seconds"] for r in rs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8, help="hidden width x width layers (default 8)")
    p.add_argument("--batch", type=int, default=128, help="microbatch size (default 128)")
    p.add_argument("--microbatches", type=int, default=48, help="microbatches per timed epoch (default 48)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--weights", default="stash,ema",
                   help="strategies for (b) and (c), NAME or NAME@pipedream for the 1F1B timing, NAME+fused with "
                        "fused_update (each stage's update one compiled loop; no (c, A) row: accumulation does not "
                        "fuse) (default stash,ema)")
    p.add_argument("--accumulate", type=int, default=8,
                   help="rows (c, A): one update per A microbatches, as (d) at M=A (default 8; 0: no such rows)")
    p.add_argument("--rounds", type=int, default=3, help="rounds at most (default 3)")
    p.add_argument("--clean", type=int, default=0,
                   help="stop once every row has this many clean rounds (no compute thread preempted over 5%% of the time)")
    p.add_argument("--quick", action="store_true", help="small and short: a smoke test")
    p.add_argument("--no-malloc-rows", dest="malloc_rows", action="store_false",
                   help="skip the second table (glibc malloc tuned as the --nproc launcher does)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/distributed-<date>.md")
    p.add_argument("--dp-only", action="store_true",
                   help="only the data-parallel comparison: K=1 x R=2 and K=2 x R=1 against plain training "
                        "(written to distributed-dp-<date>.md with --save)")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0
    if args.quick:
        args.width, args.layers, args.batch, args.microbatches, args.warmup, args.rounds = 256, 4, 32, 16, 4, 1
    base = dict(width=args.width, layers=args.layers, batch=args.batch, microbatches=args.microbatches,
                warmup=args.warmup, threads=1)
    strategies = [w for w in args.weights.split(",") if w]
    rows: dict[str, tuple[str, str, int, dict]] = {}
    if args.dp_only:
        cfg = dict(base, malloc=True)  # the --nproc launcher's allocator settings, for every row
        rows["a1"] = ("(a) plain training, 1 process, 1 thread", "plain", 1, dict(cfg))
        rows["a1x2"] = ("(a) x 2: two independent plain trainings at once, total (the 2-core ceiling)", "plain2", 2,
                        dict(cfg))
        for w in strategies:
            rows[f"c-{w}"] = (f"(c) K=2 stages x R=1, weights={w}", "distributed", 2, dict(cfg, weights=w, pp=2, dp=1))
            rows[f"e-{w}"] = (f"(e) K=1 stage x R=2 replicas, weights={w}", "distributed", 2,
                              dict(cfg, weights=w, pp=1, dp=2))
    for tuned in ((False, True) if args.malloc_rows and not args.dp_only else (False,) if not args.dp_only else ()):
        t = "-malloc" if tuned else ""
        cfg = dict(base, malloc=tuned)
        rows[f"a1{t}"] = ("(a) plain training, 1 thread", "plain", 1, dict(cfg))
        if not tuned:
            rows["a2"] = ("(a) plain training, 2 threads (for the record)", "plain", 1, dict(cfg, threads=2))
        rows[f"a1x2{t}"] = ("(a) x 2: two independent plain trainings at once, total (the 2-core ceiling)",
                            "plain2", 2, dict(cfg))
        if not tuned:
            for w in strategies:
                rows[f"b-{w}"] = (f"(b) layerpipe engine, 1 process, weights={w}", "engine", 1, dict(cfg, weights=w))
        for w in strategies:
            rows[f"c-{w}{t}"] = (f"(c) distributed runtime, 2 processes, weights={w}", "distributed", 2,
                                 dict(cfg, weights=w))
        if args.accumulate > 1:
            for w in (w for w in strategies if not w.endswith("+fused")):
                rows[f"cA-{w}{t}"] = (f"(c, A={args.accumulate}) distributed runtime, 2 processes, weights={w}, "
                                      f"one update per {args.accumulate} microbatches", "distributed", 2,
                                      dict(cfg, weights=w, accumulate=args.accumulate))
        for m in (4, 8):
            rows[f"d{m}{t}"] = (f"(d) torch pipelining Schedule1F1B, 2 processes, M={m}", "pippy", 2,
                                dict(cfg, pippy_m=m))
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in rows}
    for r in range(args.rounds):
        for key, (label, kind, nproc, cfg) in rows.items():
            sps, others = measure(kind, cfg, nproc)
            samples[key].append((sps, others))
            print(f"round {r + 1}/{args.rounds}  {label}: {sps:.1f} samples/s (preempted {100 * others:.0f}%)",
                  file=sys.stderr, flush=True)
        if args.clean and all(sum(o <= CLEAN for _, o in v) >= args.clean for v in samples.values()):
            break
    report = render_dp(args, rows, samples) if args.dp_only else render(args, rows, samples, strategies)
    print(report)
    if args.save:
        import datetime as _dt

        name = "distributed-dp" if args.dp_only else "distributed"
        path = ROOT / "benchmarks" / "results" / f"{name}-{_dt.date.today().isoformat()}.md"
        n = 2
        while path.exists():  # an earlier run of the same day stays
            path = path.with_name(f"{name}-{_dt.date.today().isoformat()}-{n}.md")
            n += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(f"saved {path}", file=sys.stderr)
    return 0


def render_dp(args, rows, samples) -> str:
    """The --dp-only table: median of the clean rounds (best round, marked !, without one)."""
    from layerpipe.report.records import environment

    env = environment()
    med, flag = {}, {}
    for k, v in samples.items():
        clean = sorted(sps for sps, o in v if o <= CLEAN)
        med[k] = clean[len(clean) // 2] if clean else max(sps for sps, _ in v)
        flag[k] = "" if clean else " !"
    lines = [
        "# Data parallelism x pipelining: throughput on 2 processes (K x R = 2)",
        "",
        f"- date: {env['date']}; commit: {env['commit']}; torch {env['torch']}; Python {env['python']}",
        f"- machine: {machine_line(env)}; every worker on 1 thread; gloo on loopback; malloc tuned as `--nproc` does",
        f"- model: MLP 256 -> {args.width} x {args.layers} layers (ReLU) -> 10; SGD momentum 0.9 (fused); "
        f"microbatch b = {args.batch} per replica (R=2: global microbatch {2 * args.batch}); "
        f"{args.microbatches} microbatches per timed epoch after {args.warmup} warm-up",
        f"- samples/s: median of the clean rounds (no worker's compute thread off a CPU over {100 * CLEAN:.0f}% of "
        f"the window); ! marks a row without a clean round (best round shown)",
        f"- command: `.venv/bin/python benchmarks/distributed_throughput.py --dp-only"
        f"{' --quick' if args.quick else ''} --weights {args.weights} --width {args.width} --layers {args.layers} "
        f"--batch {args.batch} --microbatches {args.microbatches} --warmup {args.warmup} --rounds {args.rounds} --save`",
        "",
        "| configuration | samples/s | vs (a) 1 process | rounds: samples/s (preempted) |",
        "|---|---:|---:|---|",
    ]
    for key, (label, *_rest) in rows.items():
        lines.append(f"| {label} | {med[key]:.1f}{flag[key]} | {med[key] / med['a1']:.2f}x | "
                     f"{', '.join(f'{v:.0f} ({100 * o:.0f}%)' for v, o in samples[key])} |")
    return "\n".join(lines) + "\n"


def render(args, rows, samples, strategies) -> str:
    from layerpipe.report.records import environment

    env = environment()
    # per row: the median of its clean rounds (no compute thread kept off a CPU by other
    # processes more than 5% of the timed window); a row without a clean round shows its
    # best round, marked "!"
    med, flag = {}, {}
    for k, v in samples.items():
        clean = sorted(sps for sps, o in v if o <= CLEAN)
        med[k] = clean[len(clean) // 2] if clean else max(sps for sps, _ in v)
        flag[k] = "" if clean else " !"
    lines = [
        "# Distributed runtime throughput (2 stages, one core per stage)",
        "",
        f"- date: {env['date']}; commit: {env['commit']}; torch {env['torch']}; Python {env['python']}",
        f"- machine: {machine_line(env)}; every worker on 1 thread (a2: 2 threads)",
        f"- model: MLP 256 -> {args.width} x {args.layers} layers (ReLU) -> 10, "
        f"{sum(p.numel() for p in make_model(args.width, args.layers).parameters()) / 1e6:.2f} M parameters, "
        f"split {two_stage_split(make_model(args.width, args.layers))} layers; SGD momentum 0.9 (fused), an update per "
        f"microbatch in (a), (b), (c), per step of M microbatches in (d), per A in (c, A)",
        f"- microbatch {args.batch}; {args.microbatches} microbatches per timed epoch after {args.warmup} warm-up; "
        f"median of the clean rounds of each row: rounds in which no worker's compute thread waited for a CPU "
        f"more than {100 * CLEAN:.0f}% of the timed window (Linux schedstat run-queue wait: other processes on the "
        f"machine); ! marks a row without a clean round (its best round shown)",
        f"- command: `.venv/bin/python benchmarks/distributed_throughput.py"
        f"{' --quick' if args.quick else ''} --rounds {args.rounds}{f' --clean {args.clean}' if args.clean else ''}"
        f"{f' --weights {args.weights}' if args.weights != 'stash,ema' else ''}"
        f"{' --no-malloc-rows' if not args.malloc_rows else ''}"
        f"{f' --accumulate {args.accumulate}' if args.accumulate != 8 else ''} --save`",
    ]
    blocks = [("", "glibc malloc defaults")]
    if args.malloc_rows:
        blocks.append(("-malloc", "glibc malloc tuned as `layerpipe train --nproc` does (MALLOC_MMAP_THRESHOLD_ = "
                                  "MALLOC_TRIM_THRESHOLD_ = 1 GiB) for every row"))
    for t, title in blocks:
        a1 = med[f"a1{t}"]
        d_best = max(med[f"d4{t}"], med[f"d8{t}"])
        lines += ["", f"## {title}", "",
                  "| configuration | samples/s | vs (a) 1 thread | vs best (d) | rounds: samples/s (preempted) |",
                  "|---|---:|---:|---:|---|"]
        for key, (label, *_rest) in rows.items():
            if (key.endswith("-malloc")) != bool(t):
                continue
            lines.append(f"| {label} | {med[key]:.1f}{flag[key]} | {med[key] / a1:.2f}x | {med[key] / d_best:.2f}x | "
                         f"{', '.join(f'{v:.0f} ({100 * o:.0f}%)' for v, o in samples[key])} |")
        lines += ["", f"Targets (issue 15): (c) >= {TARGET_PLAIN}x (a) (the limit is 2x); (c) >= {TARGET_1F1B}x "
                      f"(d, M=8); (c) ema >= {TARGET_EMA}x (c) stash."]
        for w in strategies:
            c = med[f"c-{w}{t}"]
            d8 = c / med[f"d8{t}"]
            lines.append(f"- weights={w}: (c)/(a) = {c / a1:.2f}x ({'met' if c / a1 >= TARGET_PLAIN else 'NOT met'}); "
                         f"(c)/(d, M=4) = {c / med[f'd4{t}']:.2f}x, (c)/(d, M=8) = {d8:.2f}x "
                         f"({'met' if d8 >= TARGET_1F1B else 'NOT met'}); "
                         f"(c) / 2-core ceiling = {c / med[f'a1x2{t}']:.2f}")
            if f"cA-{w}{t}" in med:
                cA = med[f"cA-{w}{t}"]
                lines.append(f"  - with one update per {args.accumulate} microbatches, as (d) at M={args.accumulate}: "
                             f"(c, A)/(a) = {cA / a1:.2f}x (not like for like: (a) updates every microbatch), "
                             f"(c, A)/(d, M=8) = {cA / med[f'd8{t}']:.2f}x "
                             f"(like for like; {'met' if cA / med[f'd8{t}'] >= TARGET_1F1B else 'NOT met'})")
        for f in ("", "+fused"):
            if f"c-ema{f}{t}" in med and f"c-stash{f}{t}" in med:
                r = med[f"c-ema{f}{t}"] / med[f"c-stash{f}{t}"]
                lines.append(f"- (c) ema{f} / (c) stash{f} = {r:.3f}x ({'met' if r >= TARGET_EMA else 'NOT met'})")
        if f"c-ema+fused{t}" in med and f"c-stash{t}" in med:
            r = med[f"c-ema+fused{t}"] / med[f"c-stash{t}"]
            lines.append(f"- (c) ema+fused / (c) stash = {r:.3f}x ({'met' if r >= TARGET_EMA else 'NOT met'})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
