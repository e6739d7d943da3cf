"""Screen delay-compensation techniques on the zoo GPT through the public Pipeline API.

    PYTHONPATH=src python benchmarks/gpt_compensation.py --weights ema --stages 4 \
        --comp muon:lr=4e-3 --comp predict --samples 3000 --epochs 2 --seed 0 \
        --out runs/screen.jsonl [--model-option n_layer=6] [--threads 1]

One run per call: builds `layerpipe.Pipeline(model, stages, weights, optimizer=factory)`
with the techniques of `--comp` (see `layerpipe.compensate`) plugged in through the optimizer
factory, attaches the stage hooks (forward prediction), trains with a per-tick schedule
(linear warm-up over `--warmup` ticks, then cosine to 0), drains the pipeline after each
epoch, and evaluates the validation loss `--evals-per-epoch` times per epoch. Appends one
JSON line to `--out`: the configuration, the validation curve against samples seen, the
final loss, and the peak weight-history bytes (strategies plus compensations) relative to
|W|. `--weights sync` runs ordinary training with the same optimizer chain (with
`accumulate`, the synchronous run at the same effective batch).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from layerpipe import Pipeline
from layerpipe.compensate import attach, compensation_bytes, parse_spec, pipeline_optimizer
from layerpipe.data import load_dataset, loss_fn
from layerpipe.plan import sequential_spec
from layerpipe.models import build_model
from layerpipe.report.records import environment

log = logging.getLogger("gpt_compensation")


def evaluate(model: torch.nn.Module, data, loss_of) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(
            float(loss_of(model(xb), yb)) * len(xb) for xb, yb in zip(data.x_test.split(256), data.y_test.split(256))
        )
    model.train()
    return total / len(data.x_test)


def lr_factor(tick: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` ticks, then cosine decay to 0 at `total`."""
    if tick < warmup:
        return (tick + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (tick - warmup) / max(1, total - warmup)))


def run(args) -> dict:
    torch.manual_seed(args.seed)
    data = load_dataset("text", samples=args.samples)
    model = build_model("gpt", num_classes=256, input_shape=tuple(data.input_shape), **args.model_options)
    loss_of = loss_fn(data.task)
    stages = None if args.stages == "all" else int(args.stages)
    spec = sequential_spec(model, stages, args.schedule)
    delays = [0] * spec.num_stages if args.weights == "sync" else list(spec.delays)  # sync: no delay anywhere
    if args.optimizer_delays == "pipeline":  # diagnosis: the pipelined run's optimizers, whatever the weights
        delays = list(spec.delays)
    specs = [parse_spec(s) for s in args.comp]
    base = lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=args.weight_decay)  # noqa: E731
    pipe = Pipeline(model, stages=stages, weights=args.weights, optimizer=pipeline_optimizer(delays, specs, base),
                    loss_fn=loss_of, schedule=args.schedule)
    attach(pipe)
    groups = [(g, g["lr"]) for s in pipe.stages if s.optimizer is not None for g in s.optimizer.param_groups]
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    order = torch.Generator().manual_seed(args.seed)
    curve: list[tuple[int, float]] = []
    peak_history, tick, samples, t0 = 0, 0, 0, time.time()
    for _ in range(args.epochs):
        for i, idx in enumerate(torch.randperm(len(data.x_train), generator=order).split(args.batch_size)):
            scale = lr_factor(tick, total, args.warmup)
            for g, lr0 in groups:
                g["lr"] = lr0 * scale
            info = pipe.step(data.x_train[idx], data.y_train[idx])
            peak_history = max(peak_history, info.weight_history_bytes)
            tick += 1
            samples += len(idx)
            if (i + 1) % eval_every == 0 and (i + 1) < steps_per_epoch:
                # evaluation sees the live weights mid-flight: fine for a curve
                curve.append((samples, evaluate(model, data, loss_of)))
        pipe.flush()
        curve.append((samples, evaluate(model, data, loss_of)))
    comp = compensation_bytes(pipe)
    w = pipe.parameter_bytes()
    return {
        "weights": args.weights,
        "stages": args.stages,
        "delays": pipe.delays,
        "schedule": args.schedule,
        "optimizer_delays": args.optimizer_delays,
        "comp": args.comp,
        "lr": args.lr,
        "warmup": args.warmup,
        "seed": args.seed,
        "samples": args.samples,
        "epochs": args.epochs,
        "model_options": args.model_options,
        "final": curve[-1][1],
        "curve": curve,
        "history_over_W": (peak_history + comp) / w,
        "strategy_history_over_W": peak_history / w,
        "compensation_over_W": comp / w,
        "seconds": time.time() - t0,
        "env": environment(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="ema", help="sync, stash, ema, latest")
    p.add_argument("--stages", default="4", help="an int, or 'all' (one block per stage)")
    p.add_argument("--schedule", default="layerpipe", choices=("layerpipe", "pipedream"), help="delays 2 S(k) or S(k)")
    p.add_argument("--optimizer-delays", default="own", choices=("own", "pipeline"),
                   help="own: optimizers built for the run's delays (sync: none); pipeline: for the pipelined "
                        "delays even under --weights sync (the recipe's per-stage lr and momentum without staleness)")
    p.add_argument("--comp", action="append", default=[], help="technique[:k=v,...]; repeatable")
    p.add_argument("--lr", type=float, default=1e-3, help="lr of the base AdamW (optimizer techniques take their own)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=0, help="ticks of linear lr warm-up")
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--evals-per-epoch", type=int, default=4)
    p.add_argument("--model-option", action="append", default=[], help="KEY=INT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("runs/gpt-compensation.jsonl"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.model_options = {k: int(v) for k, v in (o.split("=", 1) for o in args.model_option)}
    result = run(args)
    result["tag"] = args.tag
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    log.info(
        "%s %s stages=%s comp=%s lr=%g seed=%d: final %.4f  history %.2f|W|  %.0fs",
        args.tag, args.weights, args.stages, args.comp, args.lr, args.seed, result["final"], result["history_over_W"], result["seconds"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
