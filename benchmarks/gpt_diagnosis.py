"""Where does the transformer lose under pipeline delay? A plain-PyTorch diagnosis.

    PYTHONPATH=src python benchmarks/gpt_diagnosis.py --out benchmarks/results/gpt-diagnosis \
        [--samples 3000] [--epochs 2] [--stages 4] [--threads 1]

No layerpipe engine: the zoo GPT is split into the same stages `Pipeline` would use
(parameter-balanced), and a textbook loop applies stage k's gradient d_k steps late
(gradients queued; the delayed-gradient model of method.md section 3, in which the
gradient of microbatch m is taken at the weights of step m). Runs, each with the same data
order and initialisation:

- `sync`: no delay;
- `all`: the LayerPipe delays d_k = 2 S(k) on every stage (6, 4, 2, 0 at 4 stages);
- `first-only`: only stage 0 delayed, by its full delay;
- `last-delayed-only`: only the last stage with a delay (d = 2) delayed;
- `first-at-2`: only stage 0 delayed, by 2 (separates the delay's size from its place);
- `embedding-at-2`: only the embedding layer (inside stage 0) delayed, by 2;
- `block0-at-2`: stage 0 without the embedding delayed, by 2;
- `first-at-2-emb-lr/10`: as `first-at-2`, with the embedding's lr divided by 10;
- `sync-emb-lr/10`: `sync` with the embedding's lr divided by 10.

Every `--cos-every` steps, each delayed stage's applied (stale) gradient is compared with
the fresh gradient of the same microbatch at the current weights (cosine similarity), which
isolates staleness from minibatch noise. Writes `<out>.json` (curves, cosines) and
`<out>-loss.png`, `<out>-cosine.png`.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from layerpipe.data import load_dataset, loss_fn
from layerpipe.models import build_model
from layerpipe.plan import resolve_partition, stage_delays
from layerpipe.plan.costs import param_costs
from layerpipe.plan.layers import module_layers
from layerpipe.report.records import environment

log = logging.getLogger("gpt_diagnosis")


def evaluate(model: nn.Module, data, loss_of) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(
            float(loss_of(model(xb), yb)) * len(xb) for xb, yb in zip(data.x_test.split(256), data.y_test.split(256))
        )
    model.train()
    return total / len(data.x_test)


def stage_params(model: nn.Sequential, stages: int) -> list[list[nn.Parameter]]:
    sizes = resolve_partition(len(model), stages, costs=param_costs(module_layers(model)))
    out, start = [], 0
    for size in sizes:
        out.append([p for layer in model[start : start + size] for p in layer.parameters()])
        start += size
    return out


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    from layerpipe.compensate.muon import MuonAdamW

    return MuonAdamW(params, lr=lr)


def cosine(a: list[Tensor], b: list[Tensor]) -> float:
    dot = sum(float((x * y).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float((x * x).sum()) for x in a))
    nb = math.sqrt(sum(float((y * y).sum()) for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def run(delays: list[int], args, data, seed: int, emb_lr_scale: float = 1.0) -> dict:
    torch.manual_seed(seed)
    model = build_model("gpt", num_classes=256, input_shape=tuple(data.input_shape), **args.model_options)
    loss_of = loss_fn(data.task)
    groups = stage_params(model, args.stages)
    embedding = list(model[0].parameters())
    if len(delays) == len(groups) + 1:  # the embedding as its own group before stage 0
        groups = [embedding, [p for p in groups[0] if all(p is not q for q in embedding)]] + groups[1:]
    opt = make_optimizer(args.optimizer, list(model.parameters()), args.lr)
    if emb_lr_scale != 1.0:
        rest = [p for p in model.parameters() if all(p is not q for q in embedding)]
        opt = torch.optim.AdamW([{"params": rest}, {"params": embedding, "lr_scale": emb_lr_scale}], lr=args.lr)
    queues: list[collections.deque] = [collections.deque() for _ in groups]
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    curve: dict[str, list] = {"step": [], "train": [], "val_step": [], "val": []}
    cos: dict[int, list[tuple[int, float]]] = {k: [] for k, d in enumerate(delays) if d > 0}
    step, running = 0, []
    for _ in range(args.epochs):
        for idx in torch.randperm(len(data.x_train), generator=order).split(args.batch_size):
            for g in opt.param_groups:  # cosine decay per step, as the training CLI per epoch
                g["lr"] = g.get("lr_scale", 1.0) * args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            running.append(loss.item())
            for k, (params, d) in enumerate(zip(groups, delays)):
                queues[k].append((idx, [p.grad for p in params]))
                stale_idx, stale = queues[k].popleft() if len(queues[k]) > d else (None, [None] * len(params))
                if d > 0 and stale_idx is not None and step % args.cos_every == 0:
                    cos[k].append((step, fresh_cosine(model, params, stale_idx, stale, data, loss_of)))
                for p, grad in zip(params, stale):  # None: nothing arrived yet; the optimizer skips it
                    p.grad = grad
            opt.step()
            step += 1
            if step % 20 == 0:
                curve["step"].append(step)
                curve["train"].append(sum(running) / len(running))
                running = []
            if step % args.eval_every == 0 or step == total:
                curve["val_step"].append(step)
                curve["val"].append(evaluate(model, data, loss_of))
    return {"delays": delays, "curve": curve, "cosine": {str(k): v for k, v in cos.items()}, "final_val": curve["val"][-1]}


def fresh_cosine(model, params, stale_idx, stale, data, loss_of) -> float:
    """Cosine between a stage's stale gradient and the same microbatch's gradient now."""
    saved = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    loss_of(model(data.x_train[stale_idx]), data.y_train[stale_idx]).backward()
    fresh = [p.grad.clone() for p in params]
    for p, g in zip(model.parameters(), saved):
        p.grad = g
    return cosine(stale, fresh)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        ax[0].plot(r["curve"]["step"], r["curve"]["train"], label=name)
        ax[1].plot(r["curve"]["val_step"], r["curve"]["val"], marker="o", label=name)
    ax[0].set(xlabel="step", ylabel="train loss (nats/byte)", title="training loss")
    ax[1].set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation loss")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(out.with_name(out.name + "-loss.png"), dpi=100)
    r = results.get("all")
    if r:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, pts in r["cosine"].items():
            if pts:
                s, c = zip(*pts)
                # running mean over 10 points: single cosines are noisy
                sm = [sum(c[max(0, i - 9) : i + 1]) / len(c[max(0, i - 9) : i + 1]) for i in range(len(c))]
                ax.plot(s, sm, label=f"stage {k} (d={r['delays'][int(k)]})")
        ax.set(xlabel="step", ylabel="cos(stale grad, fresh grad), same microbatch", title="run 'all'")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_name(out.name + "-cosine.png"), dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpt-diagnosis"))
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--model-option", action="append", default=[], help="KEY=INT, e.g. n_layer=4")
    p.add_argument("--runs", default="sync,all,first-only,last-delayed-only,first-at-2")
    p.add_argument("--cos-every", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.model_options = {k: int(v) for k, v in (o.split("=", 1) for o in args.model_option)}
    data = load_dataset("text", samples=args.samples)
    full = stage_delays(args.stages)
    last_delayed = max(k for k, d in enumerate(full) if d > 0)
    configs = {
        "sync": [0] * args.stages,
        "all": full,
        "first-only": [full[0]] + [0] * (args.stages - 1),
        "last-delayed-only": [full[k] if k == last_delayed else 0 for k in range(args.stages)],
        "first-at-2": [2] + [0] * (args.stages - 1),
        # five groups: embedding, rest of stage 0, stages 1..
        "embedding-at-2": [2] + [0] * args.stages,
        "block0-at-2": [0, 2] + [0] * (args.stages - 1),
        "first-at-2-emb-lr/10": [2] + [0] * (args.stages - 1),
        "sync-emb-lr/10": [0] * args.stages,
    }
    results = {}
    for name in args.runs.split(","):
        results[name] = run(configs[name], args, data, args.seed, 0.1 if name.endswith("emb-lr/10") else 1.0)
        log.info("%s delays %s: final validation loss %.4f", name, configs[name], results[name]["final_val"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"env": environment(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": results}
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(record, indent=1))
    plot(results, args.out)
    for name, r in results.items():
        mean_cos = {k: sum(c for _, c in v) / len(v) for k, v in r["cosine"].items() if v}
        log.info("%-18s delays %-14s val %.4f  mean cos %s", name, r["delays"], r["final_val"], mean_cos)
    return 0


if __name__ == "__main__":
    sys.exit(main())
