"""`layerpipe compare`: one task under several weight strategies, seeds and depths.

Runs every (stages, weights, seed) combination, one after another in this process or, with
--jobs N, N at a time in worker processes (same numbers: every run is seeded), and
writes DIR/results.md (a Markdown table: test accuracy mean and spread, weight-history
bytes as a multiple of |W|, time per epoch), DIR/curves.png (learning curves, one panel per
depth) and DIR/results.json (every run's summary and per-epoch history). `sync` does not
depend on the partition, so it runs once per seed and is shown at every depth.

Example (the paper's comparison at depths 2, 4, 8 and one layer per stage):

    layerpipe compare --model cnn1d --weights sync,stash,ema,latest --seeds 0,1,2 --stages 2 4 8 all
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from layerpipe.cli.common import add_training_arguments, config_from_args, signals_as_interrupt, strategies_help

#: what a finished (or partly finished) comparison leaves in --out
RESULT_FILES = ("results.md", "results.json", "curves.png", "partial.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare weight strategies over seeds and depths",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, sweep=True)
    p.add_argument("--weights", default="sync,stash,ema,latest",
                   help="comma-separated, each sync or a weight strategy (default sync,stash,ema,latest); " + strategies_help())
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--stages", nargs="+", default=["4"],
                   help="depths to sweep, each as for train: K, a list like 2,1,3,1, or 'all' (default 4)")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<time>-<model>); one that "
                   "already holds results is refused without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process (default 1); with --threads, jobs x threads "
                        "should not exceed the cores")
    p.set_defaults(run=run)


def _train_entry(config_fields: dict) -> dict:
    """One run of the sweep (module level so that a worker process can run it)."""
    from layerpipe.training import TrainConfig, train

    r = train(TrainConfig(**config_fields), progress=False)
    return {**r.summary(), "history": r.history}


def _run_all(jobs: dict[tuple[str, str, int], dict], workers: int, bar, on_done) -> None:
    """Run every config in `jobs`, calling on_done(key, entry) as each one finishes."""
    if workers <= 1:
        for key, fields in jobs.items():
            bar.set_postfix_str(f"stages={key[0]} weights={key[1]} seed={key[2]}")
            on_done(key, _train_entry(fields))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from layerpipe.cli.launch import die_with_parent

    # spawn, not fork: a forked child of a process with torch's thread pools can hang
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(True,))
    try:
        pending = {pool.submit(_train_entry, fields): key for key, fields in jobs.items()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)  # record each run as it ends
            for future in done:
                key = pending.pop(future)
                if future.exception() is not None:
                    raise future.exception()
                on_done(key, future.result())
    except BaseException:
        # an error, Ctrl-C, SIGTERM or SIGHUP: the workers stop now, not after their runs
        workers_now = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers_now:
            proc.terminate()
        for proc in workers_now:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        raise
    pool.shutdown()


#: settings shown in the results' command only when they differ from TrainConfig's defaults
OPTIONAL_FLAGS = ("schedule", "warmup_epochs", "stage_lr", "momentum", "weight_decay", "data_seed")


def _job_key(stages: str, weights: str, seed: int, first_stages: str) -> tuple[str, str, int]:
    """sync does not depend on the partition: one run per seed, filed under the first depth."""
    return (first_stages, weights, seed) if weights == "sync" else (stages, weights, seed)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from layerpipe.errors import LayerpipeError
    from layerpipe.report.outputs import check_output_dir
    from layerpipe.report.plots import MissingExtra, learning_curves
    from layerpipe.report.records import atomic_write_bytes, environment
    from layerpipe.report.tables import comparison_table

    strategies = [w.strip() for w in args.weights.split(",") if w.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise LayerpipeError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    configs = [(stages, w, seed) for stages in args.stages for w in strategies for seed in seeds]
    for stages, w, seed in configs:  # validate everything before the first long run
        config_from_args(args, stages=stages, weights=w, seed=seed)
    if args.jobs < 1:
        raise LayerpipeError(f"--jobs must be at least 1, got {args.jobs}")
    if len(set(strategies)) != len(strategies) or len(set(seeds)) != len(seeds):
        raise LayerpipeError(f"--weights and --seeds must not repeat an entry, got {args.weights!r} and {args.seeds!r}")
    out = Path(args.out or f"runs/compare-{_dt.datetime.now():%Y%m%d-%H%M%S}-{args.model}")
    check_output_dir(out, "--out", RESULT_FILES, overwrite=args.overwrite)
    env = environment()  # now: the commit and date of the code that runs, not of the end

    jobs: dict[tuple[str, str, int], dict] = {}
    for stages, w, seed in configs:
        key = _job_key(stages, w, seed, args.stages[0])
        jobs.setdefault(key, config_from_args(args, stages=stages, weights=w, seed=seed).to_dict())
    finished: dict[tuple[str, str, int], dict] = {}
    bar = tqdm(total=len(jobs), desc="compare", unit="run", disable=args.no_progress, dynamic_ncols=True)

    def on_done(key: tuple[str, str, int], entry: dict) -> None:
        finished[key] = entry
        bar.update()
        # after every run, so that a crash or an interrupt loses nothing finished
        atomic_write_bytes(out / "partial.json", json.dumps([{"key": list(k), **v} for k, v in finished.items()]).encode())

    try:
        with signals_as_interrupt():
            _run_all(jobs, args.jobs, bar, on_done)
    finally:
        bar.close()
    results = {(stages, w, seed): finished[_job_key(stages, w, seed, args.stages[0])] for stages, w, seed in configs}

    rows, panels = _summarise(args.stages, strategies, seeds, results)
    table = comparison_table(rows)
    first = next(iter(results.values()))
    command = _command(args)
    md = (
        f"# {args.model} on {first['dataset']}: weight strategies compared\n\n"
        f"Command: `{command}`\n\n"
        f"Machine: {env['processor']}, {env['cpus']} CPUs, torch {env['torch']}, python {env['python']}; "
        f"date {env['date']}; commit {env['commit']}\n\n"
        f"Config: {first['epochs']} epochs, seeds {args.seeds}\n\n{table}\n\n![learning curves](curves.png)\n"
    )
    atomic_write_bytes(out / "results.md", md.encode())
    atomic_write_bytes(out / "results.json", json.dumps(
        {"environment": env, "command": command, "runs": [{"key": list(k), **v} for k, v in results.items()]}, indent=1
    ).encode())
    wrote = [out / "results.md", out / "results.json"]
    try:
        wrote.insert(1, learning_curves(panels, out / "curves.png"))
    except MissingExtra as exc:
        print(f"layerpipe compare: warning: {exc}; curves.png not drawn", file=sys.stderr)
    (out / "partial.json").unlink(missing_ok=True)
    print(table)
    print(f"\nwrote {', '.join(map(str, wrote))}")
    return 0


def _microbatch(run: dict) -> str:
    """"2" or, with gradient accumulation, "2 (2 per update)"; "?" for results saved before the field."""
    mb, every = run.get("microbatch", "?"), run.get("accumulation", 1)
    return f"{mb} ({every} per update)" if every > 1 else str(mb)


def _summarise(depths: list[str], strategies: list[str], seeds: list[int], results: dict) -> tuple[list[dict], dict]:
    """Table rows (one per depth and strategy) and learning-curve panels (one per depth)."""
    rows, panels = [], {}
    for stages in depths:
        panel = {}
        # the partition of the depth, taken from any pipelined run of it
        ref = next((results[(stages, w, s)] for w in strategies if w != "sync" for s in seeds), None)
        for w in strategies:
            runs = [results[(stages, w, s)] for s in seeds]
            rows.append({
                "stages": stages if ref is None else ",".join(map(str, ref["stages"])),
                "delays": "0 (sync)" if w == "sync" or ref is None else ",".join(map(str, ref["delays"])),
                "microbatch": _microbatch(runs[0]),
                "weights": w,
                "accuracies": [r["test_accuracy"] for r in runs],
                "losses": [r["test_loss"] for r in runs],
                "history_x": max(r["weight_history_bytes"] for r in runs) / runs[0]["parameter_bytes"],
                "seconds_per_epoch": sum(r["seconds_per_epoch"] for r in runs) / len(runs),
            })
            panel[w] = [[h["test_accuracy"] for h in r["history"]] for r in runs]
        panels[f"K = {len(ref['stages']) if ref else stages}"] = panel
    return rows, panels


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces the comparison (non-default flags only)."""
    from layerpipe.training import TrainConfig

    return "layerpipe compare " + " ".join(
        [f"--model {args.model}", f"--weights {args.weights}", f"--seeds {args.seeds}", "--stages " + " ".join(args.stages)]
        + [f"--{k.replace('_', '-')} {v}" for k in ("dataset", "samples", "epochs", "batch_size", "max_stale_samples", "optimizer", "lr",
                                                       "lr_schedule", "sync_warmup")
           if (v := getattr(args, k)) is not None]
        + [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in OPTIONAL_FLAGS
           if getattr(args, k) != TrainConfig.__dataclass_fields__[k].default]
        + [f"--model-option {item}" for item in args.model_option]
        + [f"--weight-option {item}" for item in args.weight_option]
        + [f"--compensation {item}" for item in (args.compensation or [])]
    )

