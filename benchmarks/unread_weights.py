"""How much of the weight history a backward never reads: the upper bound of skipping it.

    .venv/bin/python benchmarks/unread_weights.py [--models cnn1d,mlp-512,mlp-ln-128,gpt] [--depths 2,4,8]

Issue 15 lists "skipping the rebuild where the backward does not read the weights" as an idea
to measure. A parameter's backward reads it only where autograd saves it (the input gradient of
a Linear reads its weight; no backward reads a bias, and stage 0's first layer, whose input needs
no gradient, saves no weight). One forward per stage under a saved-tensor hook that records
every parameter it sees; the table shows the share of the parameters no hook saw and of the
stash history (parameters x delay) they hold: what a strategy could skip at most.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_overhead import MODELS, batch_for  # noqa: E402

from layerpipe import Pipeline  # noqa: E402
from layerpipe.models import build_model, example_input  # noqa: E402


def unread_share(pipe: Pipeline, x: torch.Tensor) -> tuple[float, float]:
    """(share of parameters, share of stash history) no stage's forward saved for its backward."""
    total = unread = history = unread_history = 0
    h = x
    for k, stage in enumerate(pipe.stages):
        ptrs = {p.untyped_storage().data_ptr() for p in stage.params}
        seen: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.layout is torch.strided and t.untyped_storage().data_ptr() in ptrs:
                seen.add(t.untyped_storage().data_ptr())
            return t

        inp = h.detach()
        if k > 0 and inp.is_floating_point():
            inp.requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = stage.module(inp)
        for p in stage.params:
            n, skipped = p.numel(), p.untyped_storage().data_ptr() not in seen
            total, history = total + n, history + n * stage.delay
            unread, unread_history = unread + n * skipped, unread_history + n * stage.delay * skipped
    return unread / total, unread_history / max(history, 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn1d,mlp-512,mlp-ln-128,gpt")
    p.add_argument("--depths", default="2,4,8")
    args = p.parse_args()
    torch.manual_seed(0)
    print("| model | K | unread parameters | unread share of stash history |")
    print("|---|---|---:|---:|")
    for name in args.models.split(","):
        for k in (int(v) for v in args.depths.split(",")):
            if name == "gpt":
                model, x = build_model("gpt", n_layer=max(4, k - 2)), example_input("gpt", 4)  # the recipe's depths
            else:
                make, batch = MODELS[name]
                model, x = make(), batch_for(name, batch)[0]
            if k > len(model):
                continue
            params, history = unread_share(Pipeline(model, stages=k, weights="stash"), x)
            print(f"| {name} | {k} | {params:.1%} | {history:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
