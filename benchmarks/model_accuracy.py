"""Plain (synchronous, no pipeline) training of the MNIST-1D models: test accuracy and time.

    .venv/bin/python benchmarks/model_accuracy.py                      # cnn1d and snn, seeds 0 1 2
    .venv/bin/python benchmarks/model_accuracy.py --models cnn1d --seeds 0 --optimizer sgd --lr 0.05
    .venv/bin/python benchmarks/model_accuracy.py --no-norm            # the models without BatchNorm

A textbook PyTorch loop (shuffle, minibatch, loss, backward, step; no layerpipe engine)
so the numbers are the reference that pipelined training is measured against. The seed
sets the generated dataset, the initialisation and the batch order. Seconds count the
training epochs only (data generation, cached after the first run, is not counted).

Threads: these models are tiny, so one torch thread is nearly as fast as two on an idle
2-core machine (7.1 s against 5.7 s for cnn1d) and far faster when anything else runs:
with one other busy process, snn took 20.5 s on 1 thread and 114.6 s on 2 (OpenMP threads
that wait for a core spin). Hence --threads 1 by default.

Default configurations (RECOMMENDED below) are the recipes of `layerpipe.training.RECIPES`
with a constant learning rate (this loop has no schedule):
  cnn1d  MNIST-1D 5000 samples (4000/1000), 30 epochs, batch 64, Adam lr 2e-3
  snn    MNIST-1D 5000 samples (4000/1000), 25 epochs, batch 64, Adam lr 3e-3 (T = 4 steps)
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from layerpipe.data import load_dataset, loss_fn
from layerpipe.models import build_model
from layerpipe.report.records import environment

RECOMMENDED = {
    "cnn1d": dict(samples=5000, epochs=30, batch_size=64, optimizer="adam", lr=2e-3),
    "snn": dict(samples=5000, epochs=25, batch_size=64, optimizer="adam", lr=3e-3),
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise SystemExit(f"unknown optimizer {name!r}")


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000)))
    model.train()
    return correct / len(y)


def run(model_name: str, seed: int, samples: int, epochs: int, batch_size: int, optimizer: str, lr: float,
        norm: bool = True) -> dict:
    t0 = time.perf_counter()
    data = load_dataset("mnist1d", samples=samples, seed=seed)
    data_seconds = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=data.num_classes, input_shape=data.input_shape, norm=norm)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    loss_of = loss_fn(data.task)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=gen)
        for idx in order.split(batch_size):
            loss = loss_of(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append(test_accuracy(model, data.x_test, data.y_test))
    seconds = time.perf_counter() - start
    return dict(model=model_name, seed=seed, acc=curve[-1], best=max(curve), seconds=seconds, data_seconds=data_seconds,
                train=len(data.y_train), test=len(data.y_test), curve=curve)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(RECOMMENDED), choices=list(RECOMMENDED))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--samples", type=int, help="MNIST-1D samples in all (80%% train)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the module docstring)")
    p.add_argument("--no-norm", dest="norm", action="store_false", help="build the models without BatchNorm")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(f"# {env['date']}  commit {env['commit']}  torch {env['torch']}  python {env['python']}  "
          f"{env['cpus']} CPUs, {env['torch_threads']} torch threads")
    print(f"BatchNorm: {'yes' if args.norm else 'no'}")
    print("| model | samples (train/test) | epochs | batch | optimizer | lr | seed | test acc (final) | best epoch acc | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        cfg = dict(RECOMMENDED[name])
        for key in cfg:
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
        results = []
        for seed in args.seeds:
            r = run(name, seed, **cfg, norm=args.norm)
            results.append(r)
            print(f"| {name} | {cfg['samples']} ({r['train']}/{r['test']}) | {cfg['epochs']} | {cfg['batch_size']} | "
                  f"{cfg['optimizer']} | {cfg['lr']:g} | {seed} | {r['acc']:.3f} | {r['best']:.3f} | {r['seconds']:.1f} |",
                  flush=True)
        accs = [r["acc"] for r in results]
        secs = [r["seconds"] for r in results]
        print(f"| {name} | mean of {len(results)} seeds | | | | | | {sum(accs) / len(accs):.3f} (min {min(accs):.3f}) | | "
              f"{sum(secs) / len(secs):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
