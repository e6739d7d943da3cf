"""GPU check (issue 5): the engine on CUDA, every weight strategy, in one short script.

    python3 benchmarks/gpu_check.py --out DIR                          # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --quick --out /tmp/gpu    # CPU smoke test

Part 1: ResNet-18 (CIFAR form, 100 classes, 11.2 M parameters) on CIFAR-shaped random data
at 8 stages (delays 14..0), SGD lr 0.005 momentum 0.9 (latest diverges at 0.05 on random labels): time per tick (median of 3 timed windows after
filling the pipeline) and peak GPU memory (`torch.cuda.max_memory_allocated`, reset before
each strategy's model is built) for sync, stash, ema and latest, measured one after another
in this process, with the bytes of weight history each strategy holds.

Part 1 again under bf16 autocast (`mixed_precision="bf16"`) for sync, stash and ema.

Part 2: the byte-level transformer (`--model gpt`, its recipe: Muon + PipeMare
compensation, per-microbatch cosine) on this Python's standard-library sources at 4 stages
(delays 6,4,2,0): validation loss after the same training under sync, stash and ema
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
import gc
import json
import multiprocessing
import os
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


def resnet_tick_times(weights: str, device: torch.device, stages: int, batch: int, ticks: int,
                      precision: str | None = None) -> dict[str, Any]:
    """Time per tick and peak memory of ResNet-18 under one weight strategy (and autocast)."""
    gc.collect()  # the previous strategy's pipeline (hooks make reference cycles) must be gone
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model("resnet18").to(device)
    pipe = Pipeline(model, stages=stages, weights=weights, loss_fn=F.cross_entropy, mixed_precision=precision,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.005, momentum=0.9))
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
    return {
        "weights": weights if precision is None else f"{weights} + {precision}",
        "stages": pipe.stage_sizes,
        "delays": pipe.delays,
        "seconds_per_tick": statistics.median(windows),
        "peak_memory_bytes": peak_bytes(device),
        "weight_history_bytes": pipe.weight_history_bytes(),
        "parameter_bytes": pipe.parameter_bytes(),
    }


def gpt_validation(weights: str, device: str, samples: int, epochs: int, stages: str = "4",
                   model_options: tuple[str, ...] = (), seed: int = 0) -> dict[str, Any]:
    """Train the transformer under one strategy (its recipe); its validation loss and accuracy."""
    config = TrainConfig(model="gpt", stages=stages, weights=weights, device=device, samples=samples,
                         epochs=epochs, threads=0, seed=seed, model_options=parse_model_options(list(model_options)))
    result = train(config, progress=False)
    return {
        "weights": weights,
        "stages": stages,
        "model_options": list(model_options),
        "seed": seed,
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


def run_part(name: str, fn, report: dict[str, Any], out: Path) -> None:
    """Run one measurement; a failure is recorded (and printed) instead of losing the rest."""
    try:
        record(name, fn(), report, out)
    except Exception:  # the script must still write what it measured
        report.setdefault("errors", []).append(f"{name}: {traceback.format_exc()}")
        print(f"{name} FAILED:\n{traceback.format_exc()}", flush=True)
        save(report, out)


def record(name: str, row: dict[str, Any], report: dict[str, Any], out: Path) -> None:
    report.setdefault(name, []).append(row)
    print(f"{name}: {json.dumps(row)}", flush=True)
    save(report, out)


def run_gpt_parts(runs: list[dict[str, Any]], jobs: int, report: dict[str, Any], out: Path) -> None:
    """The transformer runs, `jobs` at a time in spawned processes (CUDA needs spawn)."""
    if jobs <= 1:
        for kwargs in runs:
            run_part("gpt", lambda: gpt_validation(**kwargs), report, out)
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(gpt_validation, **kwargs): kwargs for kwargs in runs}
        for future in as_completed(futures):
            try:
                record("gpt", future.result(), report, out)
            except Exception:
                report.setdefault("errors", []).append(f"gpt {futures[future]}: {traceback.format_exc()}")
                print(f"gpt {futures[future]} FAILED:\n{traceback.format_exc()}", flush=True)
                save(report, out)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# GPU check: ResNet-18 at 8 stages, transformer at 4 stages", "",
             f"Command: `{report['command']}`", "",
             f"Device: {report['device_name']}; torch {env['torch']}, python {env['python']}; "
             f"date {env['date']}; commit {env['commit']}", ""]
    rows = report.get("resnet18", [])
    if rows:
        sync = next((r for r in rows if r["weights"] == "sync"), None)
        piped = rows[-1]  # delays as pipelined (sync's are all zero)
        lines += ["## ResNet-18 (CIFAR form), random 32x32 data, batch "
                  f"{report['args']['resnet_batch']}, stages {piped['stages']}, delays {piped['delays']}", "",
                  "| weights | ms / tick | x sync | peak memory (MiB) | x sync | weight history / \\|W\\| |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
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
                  "| stages | model options | seed | weights | delays | validation loss (nats/byte) | next-byte accuracy % "
                  "| weight history (MiB) | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["stages"], r["model_options"], r["seed"], STRATEGIES.index(r["weights"]))):
            lines.append(f"| {r['stages']} | {' '.join(r['model_options']) or '-'} | {r['seed']} | {r['weights']} | {r['delays']} "
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
    p.add_argument("--gpt-jobs", type=int, default=1, help="transformer runs at a time, each its own process")
    p.add_argument("--parts", default="resnet,resnet-bf16,gpt", help="which parts to run, comma-separated")
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
    if report["environment"]["commit"] is None:  # a copy of the tree without .git: the caller names it
        report["environment"]["commit"] = os.environ.get("LAYERPIPE_COMMIT")
    parts = set(args.parts.split(","))
    if "resnet" in parts:
        for weights in STRATEGIES:
            run_part("resnet18", lambda: resnet_tick_times(weights, device, 8, args.resnet_batch, args.ticks), report, out)
    if "resnet-bf16" in parts:  # bf16 autocast: the strategies stay exact (issue 13)
        for weights in ("sync", "stash", "ema"):
            run_part("resnet18", lambda: resnet_tick_times(weights, device, 8, args.resnet_batch, args.ticks, "bf16"),
                     report, out)
    if "gpt" in parts:
        runs = [dict(weights=w, device=str(device), samples=args.gpt_samples, epochs=args.gpt_epochs,
                     stages=args.gpt_stages, model_options=tuple(args.gpt_option), seed=int(seed))
                for seed in args.gpt_seeds.split(",") for w in ("sync", "stash", "ema")]
        run_gpt_parts(runs, args.gpt_jobs, report, out)
    save(report, out)
    print(markdown(report))
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
