"""GPU check (issue 5): the engine on CUDA, every weight strategy, in one short script.

    python3 benchmarks/gpu_check.py --out DIR                          # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --quick --out /tmp/gpu    # CPU smoke test

Part 1: ResNet-18 (CIFAR form, 100 classes, 11.2 M parameters) on CIFAR-shaped random data
at 8 stages (delays 14..0), SGD lr 0.005 momentum 0.9 (latest diverges at 0.05 on random labels): time per tick (median of 3 timed windows after
filling the pipeline) and peak GPU memory (`torch.cuda.max_memory_allocated`, reset before
each strategy's model is built) for sync, stash, ema and latest, measured one after another
in this process, with the bytes of weight history each strategy holds.

Part 1 again under bf16 autocast (`mixed_precision="bf16"`) for sync, stash and ema, and with
the fused update (`fused_update=True`: each stage's update one compiled loop per tensor; on a
GPU torch.compile writes triton kernels, compiled in the warm-up) for sync, stash and ema
(`--parts resnet-fused`).

Part 2: the byte-level transformer (`--model gpt`, its recipe: Muon + PipeMare
compensation, per-microbatch cosine, the 1F1B timing) on this Python's standard-library
sources at 4 stages (delays 3,2,1,0; 6,4,2,0 before the recipe took the 1F1B timing): validation loss after the same training under sync, stash and ema
(`layerpipe.training.train`, the library's own loop). The transformer is too small to fill
the GPU, so with --gpt-jobs N its runs go N at a time in separate processes (the same
numbers: every run is seeded); part 1 runs alone before them, so its timings are clean.

Writes DIR/gpu-check.json (every number, the machine, versions, date, commit) and
DIR/gpu-check.md, rewritten after every measurement (a kill keeps what was measured). Needs only torch and numpy (no tqdm, matplotlib, scikit-learn or
mnist1d; checked by running --quick with those imports blocked), and runs from a checkout
without installing the package (it puts src/ on the path itself).
On an H200 the defaults should take a few minutes (an estimate: never run on one yet).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout, not installed

from layerpipe import Pipeline  # noqa: E402
from layerpipe.cli.common import parse_model_options  # noqa: E402
from layerpipe.models import build_model  # noqa: E402
from layerpipe.report.records import environment  # noqa: E402
from layerpipe.training import TrainConfig, train  # noqa: E402

STRATEGIES = ("sync", "stash", "ema", "latest")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def resnet_tick_times(weights: str, device: str, stages: int, batch: int, ticks: int,
                      precision: str | None = None, fused: bool = False) -> dict[str, Any]:
    """Time per tick and peak memory of ResNet-18 under one weight strategy (and autocast, or
    the fused update)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model("resnet18").to(device)
    pipe = Pipeline(model, stages=stages, weights=weights, loss_fn=F.cross_entropy, mixed_precision=precision,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.005, momentum=0.9), fused_update=fused)
    g = torch.Generator(device="cpu").manual_seed(1)
    data = [(torch.randn(batch, 3, 32, 32, generator=g).to(device), torch.randint(0, 100, (batch,), generator=g).to(device))
            for _ in range(4)]
    for i in range(2 * pipe.num_stages + 2):  # fill the pipeline: every stage busy from here on
        pipe.step(*data[i % 4])
    windows = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for i in range(ticks):
            pipe.step(*data[i % 4])
        synchronize(device)
        windows.append((time.perf_counter() - start) / ticks)
    fused_stages = sum(1 for s in pipe.stages if s.fused is not None and s.fused.fused_steps > 0)
    if fused and fused_stages == 0:
        raise RuntimeError("fused_update: no stage's update fused")
    label = weights if precision is None else f"{weights} + {precision}"
    return {
        "weights": f"{label} + fused update ({fused_stages} of {pipe.num_stages} stages)" if fused else label,
        "strategy": weights, "variant": "fused" if fused else (precision or ""),
        "stages": pipe.stage_sizes,
        "delays": pipe.delays,
        "seconds_per_tick": statistics.median(windows),
        "peak_memory_bytes": peak_bytes(device),
        "weight_history_bytes": pipe.weight_history_bytes(),
        "parameter_bytes": pipe.parameter_bytes(),
    }


def gpt_validation(weights: str, device: str, samples: int, epochs: int, stages: str = "4",
                   model_options: tuple[str, ...] = (), seed: int = 0, lr: float | None = None) -> dict[str, Any]:
    """Train the transformer under one strategy (its recipe, or another lr); its validation loss."""
    config = TrainConfig(model="gpt", stages=stages, weights=weights, device=device, samples=samples, lr=lr,
                         epochs=epochs, threads=0, seed=seed, model_options=parse_model_options(list(model_options)))
    result = train(config, progress=False)
    return {
        "weights": weights,
        "stages": stages,
        "model_options": list(model_options),
        "seed": seed,
        "lr": config.lr,
        "delays": result.delays,
        "validation_loss": result.test_loss,
        "validation_accuracy": result.test_accuracy,
        "seconds": result.seconds,
        "weight_history_bytes": result.weight_history_bytes,
        "epochs": epochs,
        "samples": samples,
    }


def save(report: dict[str, Any], out: Path) -> None:
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))


def record(name: str, row: dict[str, Any], report: dict[str, Any], out: Path) -> None:
    report.setdefault(name, []).append(row)
    print(f"{name}: {json.dumps(row)}", flush=True)
    save(report, out)


def run_in_processes(name: str, fn, runs: list[dict[str, Any]], jobs: int, report: dict[str, Any], out: Path) -> None:
    """Each run in a fresh spawned process (CUDA needs spawn), `jobs` at a time: a fresh
    process per run also gives each its own clean peak-memory count."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(jobs, 1), mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(fn, **kwargs): kwargs for kwargs in runs}
        for future in as_completed(futures):
            try:
                record(name, future.result(), report, out)
            except Exception:  # the script must still write what it measured
                report.setdefault("errors", []).append(f"{name} {futures[future]}: {traceback.format_exc()}")
                print(f"{name} {futures[future]} FAILED:\n{traceback.format_exc()}", flush=True)
                save(report, out)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# GPU check: ResNet-18 at 8 stages, transformer at 4 stages", "",
             f"Command: `{report['command']}`", "",
             f"Device: {report['device_name']}; torch {env['torch']}, python {env['python']}; "
             f"date {env['date']}; commit {env['commit']}", ""]
    rows = report.get("resnet18", [])
    if rows:
        # each row against sync in the same variant (fp32, bf16 autocast, fused update)
        syncs = {r.get("variant", ""): r for r in rows if r.get("strategy", r["weights"]) == "sync"}
        piped = max(rows, key=lambda r: sum(r["delays"]))  # delays as pipelined (sync's are all zero)
        lines += ["## ResNet-18 (CIFAR form), random 32x32 data, batch "
                  f"{report['args']['resnet_batch']}, stages {piped['stages']}, delays {piped['delays']}", "",
                  "| weights | ms / tick | x sync (same variant) | peak memory (MiB) | x sync | weight history / \\|W\\| |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            sync = syncs.get(r.get("variant", ""), syncs.get(""))
            t_ratio = r["seconds_per_tick"] / sync["seconds_per_tick"] if sync else float("nan")
            peak = r["peak_memory_bytes"]
            m_ratio = peak / sync["peak_memory_bytes"] if sync and peak and sync["peak_memory_bytes"] else float("nan")
            peak_text = f"{peak / 2**20:.0f}" if peak is not None else "n/a (CPU)"
            lines.append(f"| {r['weights']} | {1e3 * r['seconds_per_tick']:.2f} | {t_ratio:.2f} | {peak_text} | "
                         f"{m_ratio:.2f} | {r['weight_history_bytes'] / r['parameter_bytes']:.2f} |")
        lines.append("")
    rows = report.get("gpt", [])
    if rows:
        lines += [f"## Transformer (gpt, byte level, its recipe), {rows[0]['samples']} windows, {rows[0]['epochs']} epochs", "",
                  "| stages | model options | seed | lr | weights | delays | validation loss (nats/byte) "
                  "| next-byte accuracy % | weight history (MiB) | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["stages"], r["model_options"], r["seed"], -r["lr"], STRATEGIES.index(r["weights"]))):
            lines.append(f"| {r['stages']} | {' '.join(r['model_options']) or '-'} | {r['seed']} | {r['lr']:g} | {r['weights']} | {r['delays']} "
                         f"| {r['validation_loss']:.3f} | {100 * r['validation_accuracy']:.1f} | "
                         f"{r['weight_history_bytes'] / 2**20:.2f} | {r['seconds']:.0f} |")
        lines.append("")
    for err in report.get("errors", []):
        lines += ["## Error", "", "```", err.rstrip(), "```", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resnet-batch", type=int, default=128)
    p.add_argument("--ticks", type=int, default=30, help="ticks per timed window (3 windows)")
    p.add_argument("--gpt-samples", type=int, default=16000, help="text windows of 128 bytes (90%% train)")
    p.add_argument("--gpt-epochs", type=int, default=3)
    p.add_argument("--gpt-stages", default="4", help="stages of the transformer runs (e.g. 8 with n_layer=6)")
    p.add_argument("--gpt-option", action="append", default=[], metavar="KEY=VALUE",
                   help="transformer model option, repeatable (e.g. n_layer=6)")
    p.add_argument("--gpt-seeds", default="0", help="comma-separated seeds of the transformer runs")
    p.add_argument("--gpt-weights", default="sync,stash,ema", help="weight strategies of the transformer runs")
    p.add_argument("--gpt-lr", default="", help="comma-separated learning rates (default: the recipe's)")
    p.add_argument("--gpt-jobs", type=int, default=1, help="transformer runs at a time, each its own process")
    p.add_argument("--parts", default="resnet,resnet-bf16,resnet-fused,gpt",
                   help="which parts to run, comma-separated (resnet, resnet-bf16, resnet-fused, gpt)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script itself")
    args = p.parse_args()
    if args.quick:
        args.resnet_batch, args.ticks, args.gpt_samples, args.gpt_epochs = 2, 2, 200, 1
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "python3 benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "args": vars(args),
        "environment": environment(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    parts = set(args.parts.split(","))
    resnet_runs = [dict(weights=w, device=str(device), stages=8, batch=args.resnet_batch, ticks=args.ticks)
                   for w in STRATEGIES if "resnet" in parts]
    resnet_runs += [dict(weights=w, device=str(device), stages=8, batch=args.resnet_batch, ticks=args.ticks,
                         precision="bf16")  # bf16 autocast: the strategies stay exact (issue 13)
                    for w in ("sync", "stash", "ema") if "resnet-bf16" in parts]
    resnet_runs += [dict(weights=w, device=str(device), stages=8, batch=args.resnet_batch, ticks=args.ticks,
                         fused=True)  # the fused update (issue 15): sync's too, so each keeps its best update
                    for w in ("sync", "stash", "ema") if "resnet-fused" in parts]
    run_in_processes("resnet18", resnet_tick_times, resnet_runs, 1, report, out)  # one at a time: clean timings
    if "gpt" in parts:
        runs = [dict(weights=w, device=str(device), samples=args.gpt_samples, epochs=args.gpt_epochs,
                     stages=args.gpt_stages, model_options=tuple(args.gpt_option), seed=int(seed),
                     lr=float(lr) if lr else None)
                for seed in args.gpt_seeds.split(",") for lr in args.gpt_lr.split(",")
                for w in args.gpt_weights.split(",")]
        run_in_processes("gpt", gpt_validation, runs, args.gpt_jobs, report, out)
    save(report, out)
    print(markdown(report))
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
