"""The engine against hand-written plain-PyTorch loops of the same schedules: what the engine
itself costs, and what the pipelined schedule costs whatever runs it.

    .venv/bin/python benchmarks/delayed_reference.py [--models mlp-ln-128,gpt-32,encoder] [--depths 4,8]

Issue 15 asks `latest` (no weight history) within 1.03x `sync` per tick. Both do the same
arithmetic, but not on the same data: under `sync` a microbatch's backward follows its forward
in the same tick, under the pipelined schedule stage k's backward reads activations saved
d_k = 2 (K - 1 - k) ticks before, while d_k other microbatches' activations have gone
through the caches. Each cell times, on one thread (CPU time per tick, interleaved repeats,
medians, SGD momentum 0.01 / 0.9), the same model split at the same layers:

  - `plain`: one forward, one backward and one optimizer step of the whole model;
  - `hand sync`: the stages in a plain loop, each its own optimizer and `backward` call, a
    microbatch forward and backward in one tick (what `sync` runs);
  - `hand latest`: the stages in a plain loop on the pipelined schedule (stage k forwards
    microbatch t - k in tick t and applies the gradient of microbatch t - k - d_k; gradients
    and activations cross a stage boundary one tick later), each stage stepping after its
    backward on the weights as they are (autograd's version check switched off the cheapest
    way there is: the counters set back after each step);
  - `sync`, `latest`, `stash`, `ema`: the engine, through `Pipeline`.

`latest / hand latest` is the engine's own cost on that schedule; `hand latest / hand sync`
is the schedule's (in-flight activations), which no implementation of it avoids on this
machine. The hand-written loops share no code with the engine (only its split, so both cut
the model at the same layers); before timing a cell, both train it 12 ticks from the same
seed and the report gives the largest parameter difference (0: the same schedule, bit for bit).
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_overhead import LOSSES, MODELS, batch_for, depth_for, pipeline_for  # noqa: E402

from layerpipe.report.records import environment  # noqa: E402

ENGINE = ("sync", "latest", "stash", "ema")
HAND = ("plain", "hand sync", "hand latest")
VARIANTS = HAND + ENGINE
#: `--stage-by-stage`: the pipelined loop with each stage's forward, backward and step together
STAGE_BY_STAGE = "hand latest, stage by stage"
#: autograd's version-counter reset (private; the cheapest way to let a backward read weights
#: updated in place after its forward)
set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
if set_versions is None:
    raise SystemExit(f"delayed_reference.py needs torch's version-counter reset, missing in torch {torch.__version__}")


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


class HandLoop:
    """A model cut into `sizes` consecutive layers per stage, trained by a plain loop."""

    def __init__(self, model: nn.Sequential, sizes: list[int], delayed: bool, stage_by_stage: bool = False) -> None:
        bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        self.stages = [model[a:b] for a, b in zip(bounds, bounds[1:])]
        self.params = [tuple(p for p in s.parameters() if p.requires_grad) for s in self.stages]
        self.opts = [optimizer(ps) if ps else None for ps in self.params]
        K = len(sizes)
        self.lag = list(range(K)) if delayed else [0] * K  # forward of mb t - lag[k] in tick t
        # backward of mb t - back[k]: d_k = 2 (K - 1 - k) ticks after the forward
        self.back = [k + 2 * (K - 1 - k) for k in range(K)] if delayed else [0] * K
        self.delayed = delayed
        # each stage's forward, backward and step together, last stage first (its input came in
        # the tick before, its gradient too: the same numbers on the pipelined schedule)
        self.stage_by_stage = stage_by_stage and delayed
        self.inbox: list[dict[int, torch.Tensor]] = [{} for _ in range(K)]
        self.grads: list[dict[int, torch.Tensor]] = [{} for _ in range(K)]
        self.inflight: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(K)]
        self.t = 0

    def step(self, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        K = len(self.stages)
        if self.stage_by_stage:
            for k in range(K - 1, -1, -1):
                self._forward(k, data)
                self._backward(k)
        else:
            for k in range(K):
                self._forward(k, data)
            for k in range(K - 1, -1, -1):
                self._backward(k)
        self.t += 1

    def _forward(self, k: int, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        i = self.t - self.lag[k]
        if i < 0:
            return
        x = data[i % len(data)][0] if k == 0 else self.inbox[k].pop(i)
        out = self.stages[k](x)
        if k == len(self.stages) - 1:
            out = F.cross_entropy(out, data[i % len(data)][1])
        else:
            self.inbox[k + 1][i] = out.detach().requires_grad_()
        self.inflight[k][i] = (x, out)

    def _backward(self, k: int) -> None:
        i = self.t - self.back[k]
        if i < 0:
            return
        x, out = self.inflight[k].pop(i)
        out.backward(None if k == len(self.stages) - 1 else self.grads[k].pop(i))
        if k > 0:
            self.grads[k - 1][i] = x.grad
        opt = self.opts[k]
        if opt is not None:
            params = self.params[k]
            versions = tuple(p._version for p in params)
            opt.step()
            if self.delayed:
                set_versions(params, versions)
            opt.zero_grad(set_to_none=True)


def make_step(variant: str, make, name: str, stages: int, batch: int):
    """A closure running one tick (a step) of `variant`, warmed up past the pipeline's fill."""
    torch.manual_seed(0)
    data = [batch_for(name, batch) for _ in range(8)]
    model = make()
    k = depth_for(model, stages)
    counter = itertools.count()
    if variant in ENGINE:
        pipe = pipeline_for(name, model, stages, variant, optimizer=optimizer)

        def step() -> None:
            pipe.step(*data[next(counter) % 8])
    elif variant == "plain":
        opt = optimizer(model.parameters())

        def step() -> None:
            x, y = data[next(counter) % 8]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        sizes = pipeline_for(name, make(), stages, "sync").stage_sizes
        loop = HandLoop(model, sizes, delayed=variant.startswith("hand latest"), stage_by_stage=variant == STAGE_BY_STAGE)

        def step() -> None:
            loop.step(data)
    for _ in range(2 * k + 2):
        step()
    return step


def largest_difference(make, name: str, stages: int, batch: int, ticks: int = 12, stage_by_stage: bool = False) -> float:
    """Largest parameter difference between the engine and the hand-written loop after `ticks`
    ticks, over sync and latest (and latest stage by stage): 0 when both run the same schedule
    (checked before timing; stage by stage draws dropout's masks in another order)."""
    worst = 0.0
    runs = [("sync", False, False), ("latest", True, False)] + ([("latest", True, True)] if stage_by_stage else [])
    for engine, delayed, by_stage in runs:
        torch.manual_seed(0)
        data = [batch_for(name, batch) for _ in range(8)]
        torch.manual_seed(1)
        ours = make()
        torch.manual_seed(1)
        theirs = make()
        pipe = pipeline_for(name, ours, stages, engine, optimizer=optimizer)
        loop = HandLoop(theirs, pipe.stage_sizes, delayed=delayed, stage_by_stage=by_stage)
        for i in range(ticks):
            torch.manual_seed(100 + i)  # dropout draws the same masks in both
            pipe.step(*data[i % 8])
            torch.manual_seed(100 + i)
            loop.step(data)
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters())])
    return worst


def time_variant(variant: str, make, name: str, stages: int, batch: int, ticks: int) -> float:
    step = make_step(variant, make, name, stages, batch)
    start = time.process_time()
    for _ in range(ticks):
        step()
    return (time.process_time() - start) / ticks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp-ln-128,gpt-32,encoder", help="comma-separated, of: " + ", ".join(m for m in MODELS if m not in LOSSES))
    p.add_argument("--depths", default="4,8")
    p.add_argument("--ticks", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--stage-by-stage", action="store_true",
                   help=f"also time `{STAGE_BY_STAGE}`: each stage's forward, backward and step together "
                   "(weights kept warm in the cache between them), against the engine's order")
    p.add_argument("--out", default=None, help="also write the report to this Markdown file")
    args = p.parse_args()
    sequential = [m for m in MODELS if m not in LOSSES]  # the hand-written loops cut an nn.Sequential
    unknown = [m for m in args.models.split(",") if m not in sequential]
    if unknown:
        p.error(f"model(s) {', '.join(unknown)} not timed here; choose from {', '.join(sequential)}")
    torch.set_num_threads(1)
    env = environment()
    variants = VARIANTS + ((STAGE_BY_STAGE,) if args.stage_by_stage else ())
    extra = " --stage-by-stage" if args.stage_by_stage else ""
    lines = [
        "# The engine against hand-written loops of the same schedules (time per tick)",
        "",
        f"Command: `python benchmarks/delayed_reference.py --models {args.models} --depths {args.depths} "
        f"--ticks {args.ticks} --repeats {args.repeats}{extra}`",
        f"Machine: {env['processor']}, {env['cpus']} CPUs, 1 torch thread, CPU time; torch {env['torch']}, "
        f"python {env['python']}; date {env['date']}; commit {env['commit']}; load average at start "
        f"{os.getloadavg()[0]:.2f}",
        "",
        "| model | K | " + " | ".join(f"{v} ms" for v in variants)
        + " | hand latest / hand sync | latest / hand latest | latest / sync | stash / hand latest | ema / hand latest"
        + (" | stage by stage / hand latest" if args.stage_by_stage else "") + " | largest difference engine vs hand |",
        "|---|---|" + "---|" * (len(variants) + 6 + args.stage_by_stage),
    ]
    print("\n".join(lines), flush=True)
    for name in args.models.split(","):
        make, batch = MODELS[name]
        for depth in [int(d) for d in args.depths.split(",")]:
            difference = largest_difference(make, name, depth, batch, stage_by_stage=args.stage_by_stage)
            samples: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.repeats):
                for v in variants:
                    samples[v].append(time_variant(v, make, name, depth, batch, args.ticks))
            med = {v: 1000 * statistics.median(s) for v, s in samples.items()}
            hand = med["hand latest"]
            row = (f"| {name} | {depth_for(make(), depth)} | " + " | ".join(f"{med[v]:.2f}" for v in variants)
                   + f" | {hand / med['hand sync']:.3f}x | {med['latest'] / hand:.3f}x | {med['latest'] / med['sync']:.3f}x"
                   f" | {med['stash'] / hand:.3f}x | {med['ema'] / hand:.3f}x"
                   + (f" | {med[STAGE_BY_STAGE] / hand:.3f}x" if args.stage_by_stage else "") + f" | {difference:.1e} |")
            lines.append(row)
            print(row, flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
