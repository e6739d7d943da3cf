"""Benchmark: the two ways a stage's backward reaches past weights, side by side in one run.

    .venv/bin/python benchmarks/backward_paths.py [--models mlp-ln-128,cnn1d,ln-256,ln-384,mlp-512] [--stages 8]
    .venv/bin/python benchmarks/backward_paths.py --models gpt-32,gpt-64 --stages 6 --ticks 30

"hooks": the saved-tensor hooks hand autograd the strategy's version (every stage; what a
torch without `UntypedStorage._swap_data_ptr_` runs, and autocast or tied parameters);
"swap": the version's storage is swapped into the parameters for the backward (the
library's default where it can). Per-tick CPU time (1 thread), median of interleaved rounds,
relative to `sync`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import strategy_overhead as so  # noqa: E402  (the models and the tick timer)

import layerpipe.engine.stage as stage_module  # noqa: E402
from layerpipe.report.records import environment  # noqa: E402


def ln_mlp(width: int):
    def make() -> nn.Sequential:
        blocks = [nn.Sequential(nn.Linear(64, width), nn.LayerNorm(width), nn.GELU())]
        blocks += [nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()) for _ in range(6)]
        return nn.Sequential(*blocks, nn.Linear(width, 10))
    return make


def tiny_gpt(d_model: int):
    def make() -> nn.Sequential:
        from layerpipe.models import build_model

        return build_model("gpt", d_model=d_model, n_head=2 if d_model < 128 else 4, n_layer=4)
    return make


MODELS = {"mlp-ln-128": (so.ln_mlp, 32, "mlp-ln-128"), "cnn1d": (so.cnn1d, 32, "cnn1d"),
          "ln-256": (ln_mlp(256), 32, "mlp-ln-128"), "ln-384": (ln_mlp(384), 32, "mlp-ln-128"),
          "mlp-512": (so.wide_mlp, 64, "mlp-512"),
          # the zoo's byte-level GPT, narrow: many saved tensors per stage (attention), small weights
          "gpt-32": (tiny_gpt(32), 2, "gpt"), "gpt-64": (tiny_gpt(64), 2, "gpt"), "gpt-128": (tiny_gpt(128), 4, "gpt")}


def time_gpt(make, stages: int, weights: str, ticks: int, batch: int, clock) -> float:
    """Seconds per tick of the byte-level GPT through `Pipeline` (AdamW), windows of 128 bytes."""
    from layerpipe import Pipeline
    from layerpipe.data import loss_fn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (batch, 129), generator=g) for _ in range(8)]
    pipe = Pipeline(make(), stages=stages, weights=weights, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                    loss_fn=loss_fn("language"))
    for i in range(2 * stages + 2):
        pipe.step(data[i % 8][:, :-1], data[i % 8][:, 1:])
    start = clock()
    for i in range(ticks):
        pipe.step(data[i % 8][:, :-1], data[i % 8][:, 1:])
    return (clock() - start) / ticks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp-ln-128,cnn1d,ln-256,ln-384,mlp-512",
                   help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--stages", type=int, default=8, help="K (capped at one layer per stage)")
    p.add_argument("--strategies", default="stash,ema")
    p.add_argument("--ticks", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    env = environment()
    print(f"# Backward paths: hooks vs swap (K = {args.stages})\n")
    print(f"Command: `python benchmarks/backward_paths.py --models {args.models} --stages {args.stages} --ticks {args.ticks} --repeats {args.repeats}`  ")
    print(f"Machine: {env.get('machine')}, {env.get('cpus')} CPUs, 1 torch thread; torch {torch.__version__}; date {env.get('date')}; commit {env.get('commit')}; "
          f"storage swap available: {stage_module.swap_storages is not None}\n")
    strategies = args.strategies.split(",")
    print("| model | largest stage | sync ms/tick | " + " | ".join(f"{s} hooks | {s} swap" for s in strategies) + " |")
    print("|---|---|---|" + "---|---|" * len(strategies))
    default = stage_module.swap_storages
    for name in args.models.split(","):
        make, batch, data = MODELS[name]
        model = make()
        k = min(args.stages, len(model))
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for weights in ["sync", *strategies]:
                for path in ("hooks", "swap") if weights != "sync" else ("swap",):
                    stage_module.swap_storages = None if path == "hooks" else default
                    if data == "gpt":
                        seconds = time_gpt(make, k, weights, args.ticks, batch, time.process_time)
                    else:
                        seconds, _, _ = so.time_ticks(make, data, k, weights, args.ticks, batch, time.process_time)
                    times.setdefault((weights, path), []).append(seconds)
        stage_module.swap_storages = default
        from layerpipe import Pipeline

        pipe = Pipeline(make(), stages=k, weights="stash", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01))
        largest = max(s.parameter_bytes() for s in pipe.stages) / 1024
        sync = statistics.median(times[("sync", "swap")])
        cells = [f"{statistics.median(times[(s, path)]) / sync:.3f}x" for s in strategies for path in ("hooks", "swap")]
        print(f"| {name}, K={k} | {largest:.0f} KiB | {sync * 1e3:.2f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
