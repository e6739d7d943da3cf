"""Is the transformer's loss under pipelining the engine's doing? A plain-PyTorch check.

    .venv/bin/python benchmarks/gpt_delay_reference.py [--delay 2] [--split 3] [--epochs 2]

Trains the zoo's byte-level GPT on the stdlib text (4000 windows, batch 16, AdamW lr 1e-3,
constant) twice in a textbook loop with no layerpipe engine: once synchronously, once with
the gradient of the first `--split` blocks applied `--delay` steps late (gradients queued;
the rest of the model is updated at once). This is delayed SGD in its simplest form, so if
it loses as much validation loss as `layerpipe compare --model gpt` does at 2 stages, the
loss comes from the gradient delay itself, not from the pipeline engine.
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch

from layerpipe.data import load_dataset, loss_fn
from layerpipe.models import build_model
from layerpipe.report.records import environment


def validation_loss(model: torch.nn.Module, data, loss_of) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(float(loss_of(model(xb), yb)) * len(xb) for xb, yb in zip(data.x_test.split(256), data.y_test.split(256)))
    model.train()
    return total / len(data.x_test)


def run(delay: int, split: int, epochs: int, data, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = build_model("gpt", num_classes=256, input_shape=tuple(data.input_shape))
    loss_of = loss_fn(data.task)
    delayed = [p for block in model[:split] for p in block.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    queue: collections.deque[list[torch.Tensor]] = collections.deque()
    order = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(epochs):
        for idx in torch.randperm(len(data.x_train), generator=order).split(16):
            opt.zero_grad(set_to_none=True)
            loss_of(model(data.x_train[idx]), data.y_train[idx]).backward()
            queue.append([p.grad for p in delayed])
            stale = queue.popleft() if len(queue) > delay else [None] * len(delayed)
            for p, grad in zip(delayed, stale):  # None: nothing has arrived yet, AdamW skips it
                p.grad = grad
            opt.step()
        curve.append(validation_loss(model, data, loss_of))
    return curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay", type=int, default=2, help="steps of delay of the first blocks' gradient (default 2)")
    p.add_argument("--split", type=int, default=3, help="blocks whose gradient is delayed (default 3 of 6)")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    env = environment()
    data = load_dataset("text", samples=4000)
    sync, late = run(0, args.split, args.epochs, data), run(args.delay, args.split, args.epochs, data)
    print(f"# {env['date']}  commit {env['commit']}  torch {env['torch']}  {env['cpus']} CPUs")
    print(f"validation loss per epoch (nats/byte), first {args.split} of 6 blocks delayed by {args.delay} steps")
    print("| epoch | sync | delayed |")
    print("|---|---|---|")
    for epoch, (a, b) in enumerate(zip(sync, late), 1):
        print(f"| {epoch} | {a:.3f} | {b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
