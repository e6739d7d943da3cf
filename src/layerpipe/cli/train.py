"""`layerpipe train`: train a model of the zoo with pipelined delayed gradients.

With no arguments: the 1-D CNN on MNIST-1D (generated locally, no download) in 4 stages
with the LayerPipe2 EMA reconstruction.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from pathlib import Path

from layerpipe.cli.common import add_training_arguments, config_from_args, signals_as_interrupt, strategies_help
from layerpipe.cli.launch import WORKER_ARGS_ENV, leave_now, leave_with_failure


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with pipelined delayed gradients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(p)
    p.add_argument("--weights", default="ema", help=strategies_help() + " (default ema)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and data (default 0)")
    p.add_argument("--run-dir", default=None, help="folder for metrics.jsonl and plots (default runs/<time>-<model>-<weights>)")
    p.add_argument("--save", default=None, metavar="FILE", help="write the trained model's state_dict here (atomically)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write RUN_DIR/checkpoint.pt every N epochs (atomically)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its last checkpoint (to --epochs; a checkpoint already "
                        "at --epochs is evaluated and reported, one past it is refused)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in RUN_DIR (and an existing --save file); without it they are refused")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.add_argument("--nproc", type=int, default=None, metavar="K",
                   help="run K local processes, one stage each (gloo on 127.0.0.1); --stages defaults to K. "
                        "`torchrun --nproc-per-node K -m layerpipe train ...` works as well")
    p.add_argument("--dp", type=int, default=1, metavar="R",
                   help="data-parallel replicas of every stage: the run has K x R processes (--nproc K*R or "
                        "torchrun), rank = stage * R + replica; --batch-size is per replica (default 1)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="distributed runs: seconds a stage waits for another before the run stops (default 60)")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="distributed runs: auto (nccl when every process has its own GPU, else gloo), gloo "
                        "(CUDA tensors travel through CPU copies) or nccl")
    p.set_defaults(run=run, stages=None)  # None: 4, or the number of processes


def default_run_dir(model: str, weights: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{model}-{weights}"


def run(args: argparse.Namespace) -> int:
    from layerpipe.errors import LayerpipeError

    world = _world()
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise LayerpipeError(f"--nproc must be at least 1, got {nproc}")
    if world is not None and nproc is not None and nproc != world.world_size:
        raise LayerpipeError(f"--nproc {nproc} disagrees with WORLD_SIZE={world.world_size} set by the launcher")
    distributed = world is not None or nproc is not None
    dp = int(getattr(args, "dp", 1) or 1)
    if dp < 1:
        raise LayerpipeError(f"--dp must be at least 1, got {dp}")
    if dp > 1 and not distributed:
        raise LayerpipeError("--dp R needs K x R processes: --nproc K*R, or torchrun")
    processes = world.world_size if world is not None else nproc
    if distributed and processes % dp:
        raise LayerpipeError(f"--dp {dp} does not divide the {processes} processes (K stages x R replicas)")
    if getattr(args, "stages", None) is None:
        args.stages = str(processes // dp if distributed else 4)
    config = config_from_args(args)
    if args.resume and not args.run_dir:
        raise LayerpipeError("--resume needs --run-dir (the folder of the run to continue)")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config.model, config.weights)
    rank0 = world is None or world.rank == 0
    if distributed:  # a count that cannot fit the processes: refused before the run folder is made
        from layerpipe.plan.partition import parse_stages
        from layerpipe.training.engines import check_stage_count

        check_stage_count(parse_stages(config.stages), processes, dp=dp)
    checks_outputs = rank0 and not os.environ.get(WORKER_ARGS_ENV)  # a launched child: the launcher checked
    made_here = checks_outputs and not run_dir.exists()
    if checks_outputs:
        check_outputs(args, run_dir)
    try:
        return _run(args, config, run_dir, world, distributed, nproc, dp, rank0)
    except BaseException:
        if made_here:  # bad input found once the model is built: no empty folder left behind
            _remove_if_empty(run_dir)
        raise


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds on an empty folder
    except OSError:
        pass


def _run(args: argparse.Namespace, config, run_dir: Path, world, distributed: bool, nproc, dp: int,
         rank0: bool) -> int:
    """Train (or launch the processes that do) once the run folder is checked."""
    from layerpipe.training import train

    if distributed and world is None and nproc > 1:
        return _launch(args, config, run_dir)
    if not args.json and rank0:
        print(f"training {config.model} in stages {config.stages} with weights={config.weights} "
              f"(schedule {config.schedule}, {config.epochs} epoch{'s' if config.epochs != 1 else ''}"
              f"{f', {nproc or world.world_size} processes' if distributed else ''}"
              f"{f', {dp} replicas per stage' if dp > 1 else ''}) -> {run_dir}", flush=True)
    options = None
    if distributed:
        options = {"timeout": args.timeout, "backend": args.backend, "forced_exit": leave_now, "dp": dp}
    on_epoch = None if args.json or not rank0 else print_epoch
    try:
        with signals_as_interrupt(enabled=not distributed):  # children: SIGTERM's default, at once
            result = train(config, run_dir=run_dir, progress=not args.no_progress and rank0, save=args.save,
                           checkpoint_every=args.checkpoint_every, resume=args.resume, distributed=options,
                           on_epoch=on_epoch)
    except BaseException as exc:
        if not distributed:
            raise
        leave_with_failure(exc, rank0, "layerpipe train")
    if not rank0:
        return 0
    summary = result.summary()
    if not args.json:
        mib = 1 / 2**20
        per_update = f", {result.accumulation} per update" if result.accumulation > 1 else ""
        print(f"stages {result.stages}, delays {result.delays}, microbatch {result.microbatch}{per_update}")
        print(f"test accuracy {100 * result.test_accuracy:.2f}%  in {result.seconds:.1f} s")
        print(f"weight history held: {result.weight_history_bytes * mib:.3f} MiB "
              f"({result.weight_history_bytes / result.parameter_bytes:.2f} x |W|); "
              f"stash would hold {result.stash_bytes * mib:.3f} MiB ({result.stash_bytes / result.parameter_bytes:.2f} x |W|); "
              f"|W| = {result.parameter_bytes * mib:.3f} MiB")
        curve = run_dir / "learning_curve.png"
        print(f"metrics: {run_dir / 'metrics.jsonl'}" + (f", curve: {curve}" if curve.exists() else ""))
    else:
        print(json.dumps(summary))
    return 0


def print_epoch(r: dict) -> None:
    """One line per epoch, printed as the epoch ends (also when stdout is a pipe)."""
    print(f"  epoch {r['epoch']:3d}  train loss {r['train_loss']:.4f}  test loss {r['test_loss']:.4f}  "
          f"test accuracy {100 * r['test_accuracy']:.2f}%  ({r['seconds']:.1f} s)", flush=True)


def check_outputs(args: argparse.Namespace, run_dir: Path) -> None:
    """Every value and output place that would only fail later, refused now in one line."""
    import math

    from layerpipe.errors import LayerpipeError
    from layerpipe.report.outputs import check_output_file, check_run_dir

    if not (isinstance(args.timeout, (int, float)) and math.isfinite(args.timeout) and args.timeout > 0):
        raise LayerpipeError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.checkpoint_every < 0:
        raise LayerpipeError(f"--checkpoint-every must be 0 (never) or a positive number of epochs, got {args.checkpoint_every}")
    if args.save:
        check_output_file(args.save, "--save", overwrite=args.overwrite or args.resume)
    check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)


# -- distributed runs ---------------------------------------------------------------------------------
def _world():
    import os

    if "WORLD_SIZE" not in os.environ:
        return None
    from layerpipe.engine.distributed import World

    return World.from_env()


def _launch(args: argparse.Namespace, config, run_dir: Path) -> int:
    """`--nproc K`: start K processes of this command and wait; one line if a stage fails."""
    import os
    import sys

    from layerpipe.training.engines import check_stage_count
    from layerpipe.errors import LayerpipeError
    from layerpipe.cli.launch import WORKER_ARGS_ENV, launch
    from layerpipe.plan import parse_stages

    dp = int(getattr(args, "dp", 1) or 1)
    check_stage_count(parse_stages(config.stages), args.nproc, dp=dp)
    worker_args = {k: v for k, v in vars(args).items() if k != "run"}
    worker_args["run_dir"] = str(run_dir)  # one folder for all, chosen here
    worker_args["overwrite"] = False  # done here already
    env = dict(os.environ, **{WORKER_ARGS_ENV: json.dumps(worker_args)})
    result = launch([sys.executable, "-m", "layerpipe.cli.train"], args.nproc, env=env, dp=dp)
    if result.returncode:
        raise LayerpipeError(result.message)
    return 0


def worker_main() -> int:
    """Child side of `layerpipe train --nproc K`: run with the arguments the parent parsed."""
    import logging
    import os

    from layerpipe.cli.launch import WORKER_ARGS_ENV, die_with_parent

    die_with_parent()  # the launcher killed outright (SIGKILL): this process goes too
    args = argparse.Namespace(**json.loads(os.environ[WORKER_ARGS_ENV]))
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(run(args) or 0)


if __name__ == "__main__":
    import sys

    sys.exit(worker_main())
