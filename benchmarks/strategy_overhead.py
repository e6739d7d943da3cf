"""Benchmark: time per tick of each weight strategy relative to `sync`, and the bytes each
holds for weight history relative to |W|, side by side in one run.

    .venv/bin/python benchmarks/strategy_overhead.py [--ticks 60] [--repeats 5] [--out FILE]

Models: the MNIST-1D 1-D CNN of the zoo (batch 32) and a wider MLP (8 blocks of 512 units,
batch 64); `--models mlp-ln-128` adds a small LayerNorm MLP (8 blocks of 128, batch 32); `gpt-32`,
`encoder` and `bn-cnn` are a tiny GPT and two models not in the zoo (a transformer encoder, a
BatchNorm CNN); `hf-gpt2` a Hugging Face GPT-2 (tied embeddings) that `Pipeline` traces and cuts.
Each runs at K = 2, 4, 8 stages (capped at one layer per stage). Measurements are
interleaved round-robin (plain, sync, stash, ema, ... then again) and the median of the
repeats is reported, so that a noisy neighbour affects all strategies alike. `plain` is
the same model trained by a plain PyTorch loop (one forward, one backward, one optimizer),
the yardstick under `sync` (the engine's synchronous schedule). `--clock cpu` measures the
process's CPU time instead of wall time (steadier when other jobs share the cores). Targets (issue 15):
latest at most 1.03x sync's time, stash at most 1.08x, ema at most 1.05x, ema holding at most |W|;
the report ends with each target met or not, cell by cell. A strategy whose training diverges
(the library stops it at a NaN loss: the comparison estimators can, at large delays) shows
`diverged` in its cell instead of a time. The load average at the start is
printed too: read ratios from a loaded machine with care.

`--fused-update`: every pipeline runs each stage's update as one compiled loop per tensor
(`Pipeline(fused_update=True)`: the strategy's passes and the SGD step), and `plain` uses
torch's own fused SGD kernel (`fused=True`), so sync and plain keep their best update too.
`extrapolate` and `momentum` state no passes: their updates run unfused (`--strategies` leaves
them out).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from layerpipe import Pipeline
from layerpipe.errors import TrainingDiverged
from layerpipe.report.records import environment

#: issue 15's per-tick targets, as a multiple of sync's time
TARGETS = {"latest": 1.03, "stash": 1.08, "ema": 1.05}
STRATEGIES = ("plain", "sync", "stash", "ema", "latest", "extrapolate", "momentum")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def wide_mlp() -> nn.Sequential:
    blocks = [nn.Sequential(nn.Linear(256, 512), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(6)]
    return nn.Sequential(*blocks, nn.Linear(512, 10))


def ln_mlp() -> nn.Sequential:
    """A small LayerNorm MLP (width 128), the kind of model a new user tries first: ticks
    of a few milliseconds on one CPU thread, so the engine's own per-tick work shows most."""
    blocks = [nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU())]
    blocks += [nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU()) for _ in range(6)]
    return nn.Sequential(*blocks, nn.Linear(128, 10))


def cnn1d() -> nn.Sequential:
    from layerpipe.models import build_model

    return build_model("cnn1d")


class ClassesFirst(nn.Module):
    """(B, T, vocab) logits -> (B, vocab, T), the layout `F.cross_entropy` takes with (B, T) targets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def tiny_gpt() -> nn.Sequential:
    """The zoo's GPT at width 32 (6 blocks, 2 heads): many small parameters per stage (12 a
    block), ticks of a few ms."""
    from layerpipe.models import build_model

    return nn.Sequential(*build_model("gpt", d_model=32, n_layer=6, n_head=2), ClassesFirst())


class MeanOverTime(nn.Module):
    """(B, T, C) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def encoder() -> nn.Sequential:
    """Not in the zoo: six of torch's `nn.TransformerEncoderLayer` (width 64, 4 heads, dropout
    0.1) on sequences of 16 vectors, mean-pooled into a classifier: activations in flight
    weigh more than the weights here (about 50 K parameters a layer)."""
    layers = [nn.Linear(32, 64)]
    layers += [nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True) for _ in range(6)]
    return nn.Sequential(*layers, MeanOverTime(), nn.Linear(64, 10))


def bn_cnn() -> nn.Sequential:
    """Not in the zoo: a 2-D CNN with BatchNorm (running statistics updated in every forward)
    on 3 x 16 x 16 inputs."""
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64),
                         nn.MaxPool2d(2), block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def hf_gpt2() -> nn.Module:
    """Not an `nn.Sequential`: a Hugging Face GPT-2 built from a config (8 blocks of width 128,
    4 heads, 256 tokens, no dropout, the output layer tied to the token embedding), which
    `Pipeline` traces and cuts (`stages=K`); needs `transformers` (the test extra)."""
    try:
        import transformers
    except ImportError as err:
        raise SystemExit("the model hf-gpt2 needs transformers: pip install -e '.[test]'") from err
    config = transformers.GPT2Config(n_layer=8, n_embd=128, n_head=4, vocab_size=256, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def lm_loss(out, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss of a Hugging Face causal LM's output."""
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


#: name: (builder, batch size)
MODELS = {"cnn1d": (cnn1d, 32), "mlp-512": (wide_mlp, 64), "mlp-ln-128": (ln_mlp, 32), "gpt-32": (tiny_gpt, 2),
          "encoder": (encoder, 16), "bn-cnn": (bn_cnn, 16), "hf-gpt2": (hf_gpt2, 4)}
#: models that are not an `nn.Sequential`: their loss (the others: `F.cross_entropy`)
LOSSES = {"hf-gpt2": lm_loss}


def depth_for(model: nn.Module, stages: int) -> int:
    """K, capped at one layer per stage for an `nn.Sequential`."""
    return min(stages, len(model)) if isinstance(model, nn.Sequential) else stages


def pipeline_for(name: str, model: nn.Module, stages: int, weights: str, **options) -> Pipeline:
    """`Pipeline` over `model` as a user would build it (a traced model given its inputs)."""
    if not isinstance(model, nn.Sequential):
        options["example_inputs"] = batch_for(name, MODELS[name][1])[0]  # the batch it trains on
    return Pipeline(model, stages=depth_for(model, stages), weights=weights,
                    loss_fn=LOSSES.get(name, F.cross_entropy), **options)


def plain_loss(name: str, model: nn.Module, x, y) -> torch.Tensor:
    """The loss of one plain forward."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return LOSSES.get(name, F.cross_entropy)(out, y)


def batch_for(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "mlp-512":
        return torch.randn(n, 256), torch.randint(0, 10, (n,))
    if name == "mlp-ln-128":
        return torch.randn(n, 64), torch.randint(0, 10, (n,))
    if name == "encoder":
        return torch.randn(n, 16, 32), torch.randint(0, 10, (n,))
    if name == "bn-cnn":
        return torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))
    if name == "hf-gpt2":  # the model's keyword inputs, 64 tokens each; the tokens are the targets
        ids = torch.randint(0, 256, (n, 64))
        return {"input_ids": ids, "use_cache": False}, ids
    if name == "gpt-32":  # n sequences of 32 bytes, the next byte as target
        tokens = torch.randint(0, 256, (n, 33))
        return tokens[:, :32], tokens[:, 1:]
    from layerpipe.models import example_input

    return example_input("cnn1d", n), torch.randint(0, 10, (n,))


def _ratio(a: float, b: float) -> str:
    return "diverged" if math.isnan(a) else f"{a / b:.3f}x"


def time_plain(make_model, name: str, ticks: int, batch: int, clock, fused: bool = False) -> float:
    """Seconds per step of plain PyTorch training of the same model (`fused`: torch's fused
    SGD kernel)."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True if fused else None)
    data = [batch_for(name, batch) for _ in range(8)]

    def step(i: int) -> None:
        x, y = data[i % 8]
        opt.zero_grad(set_to_none=True)
        plain_loss(name, model, x, y).backward()
        opt.step()

    for i in range(10):
        step(i)
    start = clock()
    for i in range(ticks):
        step(i)
    return (clock() - start) / ticks


def time_ticks(make_model, name: str, stages: int, weights: str, ticks: int, batch: int,
               clock=time.perf_counter, fused: bool = False) -> tuple[float, int, int]:
    torch.manual_seed(0)
    model = make_model()
    k = depth_for(model, stages)
    pipe = pipeline_for(name, model, stages, weights, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                        fused_update=fused)
    data = [batch_for(name, batch) for _ in range(8)]
    warm = 2 * k + 2  # fill the pipeline first
    for i in range(warm):
        pipe.step(*data[i % 8])
    start = clock()
    for i in range(ticks):
        pipe.step(*data[i % 8])
    seconds = (clock() - start) / ticks
    return seconds, pipe.weight_history_bytes(), pipe.parameter_bytes()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticks", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--clock", default="wall", choices=tuple(CLOCKS), help="wall (default) or cpu (process CPU time)")
    p.add_argument("--models", default="cnn1d,mlp-512", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma-separated, from: " + ", ".join(STRATEGIES) + " (plain and sync always run)")
    p.add_argument("--fused-update", action="store_true",
                   help="every pipeline with fused_update=True, plain with torch's fused SGD (see above)")
    p.add_argument("--out", default=None, help="also write the report to this Markdown file")
    args = p.parse_args()
    unknown = set(args.strategies.split(",")) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown --strategies {', '.join(sorted(unknown))} (choose from {', '.join(STRATEGIES)})")
    strategies = tuple(w for w in STRATEGIES if w in {"plain", "sync", *args.strategies.split(",")})
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    clock = CLOCKS[args.clock]
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown --models {', '.join(sorted(unknown))} (choose from {', '.join(MODELS)})")
    models = {n: m for n, m in MODELS.items() if n in args.models.split(",")}
    lines = [
        "# Weight-strategy overhead: time per tick vs sync (and plain PyTorch), weight history vs |W|",
        "",
        f"Command: `python benchmarks/strategy_overhead.py --ticks {args.ticks} --repeats {args.repeats} "
        f"--depths {args.depths} --clock {args.clock} --threads {args.threads} --models {args.models}"
        f"{' --strategies ' + ','.join(strategies) if strategies != STRATEGIES else ''}"
        f"{' --fused-update' if args.fused_update else ''}`",
        f"Machine: {env['processor']}, {env['cpus']} CPUs, {env['torch_threads']} torch threads; "
        f"torch {env['torch']}, python {env['python']}; date {env['date']}; commit {env['commit']}; "
        f"load average at start {os.getloadavg()[0]:.2f}",
        "",
        "| model | K | stages | " + " | ".join(f"{w} time" for w in strategies) + " | "
        + " | ".join(f"{w} bytes/\\|W\\|" for w in strategies) + " | sync ms/tick |",
        "|---|---|---|" + "---|" * (2 * len(strategies) + 1),
    ]
    print("\n".join(lines), flush=True)  # the title, machine and the table's header
    ratios: list[tuple[str, dict[str, float], float]] = []
    for name, (make, batch) in models.items():
        for depth in [int(d) for d in args.depths.split(",")]:
            samples: dict[str, list[float]] = {w: [] for w in strategies}
            held: dict[str, float] = {}
            diverged: set[str] = set()  # a NaN loss stopped it: no time, shown as such
            for _ in range(args.repeats):
                for w in strategies:
                    if w == "plain":
                        samples[w].append(time_plain(make, name, args.ticks, batch, clock, args.fused_update))
                        held[w] = 0.0
                        continue
                    if w in diverged:
                        continue
                    try:
                        sec, hist, params = time_ticks(make, name, depth, w, args.ticks, batch, clock, args.fused_update)
                    except TrainingDiverged:  # a comparison estimator may (the library stops it)
                        diverged.add(w)
                        continue
                    samples[w].append(sec)
                    held[w] = hist / params
            med = {w: statistics.median(v) if w not in diverged else math.nan for w, v in samples.items()}
            k = depth_for(make(), depth)
            sizes = pipeline_for(name, make(), depth, "sync").stage_sizes
            row = (f"| {name} | {k} | {','.join(map(str, sizes))} | "
                   + " | ".join(_ratio(med[w], med["sync"]) for w in strategies) + " | "
                   + " | ".join("-" if w in diverged else f"{held[w]:.2f}" for w in strategies)
                   + f" | {1000 * med['sync']:.2f} |")
            plain_row = "|   (vs plain) | | | " + " | ".join(_ratio(med[w], med["plain"]) for w in strategies) + " |"
            lines += [row, plain_row]
            print(row, plain_row, sep="\n", flush=True)
            ratios.append((f"{name} K={k}", {w: med[w] / med["sync"] for w in TARGETS if w in med}, held.get("ema", math.nan)))
    lines += ["", "Issue 15 targets (x sync): " + ", ".join(f"{w} <= {t}" for w, t in TARGETS.items()) + ", ema history <= 1.00 |W|"]
    for cell, r, ema_held in ratios:
        verdict = [f"{w} {r[w]:.3f}x {'met' if r[w] <= t else 'NOT met'}" for w, t in TARGETS.items() if w in r]
        verdict.append(f"ema history {ema_held:.2f} |W| {'met' if ema_held <= 1.0 else 'NOT met'}")
        if any(math.isnan(v) for v in r.values()):
            verdict.append("(nan: the strategy's training diverged)")
        lines.append(f"- {cell}: " + "; ".join(verdict))
    print("\n".join(lines[-len(ratios) - 1:]), flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
