"""`layerpipe train`: train a model of the zoo with pipelined delayed gradients.

With no arguments: the 1-D CNN on MNIST-1D (generated locally, no download) in 4 stages
with the LayerPipe2 EMA reconstruction.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

from layerpipe.cli.common import STRATEGY_HELP, add_training_arguments, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with pipelined delayed gradients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_arguments(p)
    p.add_argument("--weights", default="ema", help=STRATEGY_HELP + " (default ema)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and data (default 0)")
    p.add_argument("--run-dir", default=None, help="folder for metrics.jsonl and plots (default runs/<time>-<model>-<weights>)")
    p.add_argument("--save", default=None, metavar="FILE", help="write the trained model's state_dict here (atomically)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write RUN_DIR/checkpoint.pt every N epochs (atomically)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    p.set_defaults(run=run)


def default_run_dir(model: str, weights: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{model}-{weights}"


def run(args: argparse.Namespace) -> int:
    from layerpipe.errors import LayerpipeError
    from layerpipe.train import train

    config = config_from_args(args)
    if args.resume and not args.run_dir:
        raise LayerpipeError("--resume needs --run-dir (the folder of the run to continue)")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config.model, config.weights)
    if not args.json:
        print(f"training {config.model} in stages {config.stages} with weights={config.weights} "
              f"(schedule {config.schedule}, {config.epochs} epochs) -> {run_dir}")
    result = train(config, run_dir=run_dir, progress=not args.no_progress, save=args.save,
                   checkpoint_every=args.checkpoint_every, resume=args.resume)
    summary = result.summary()
    if not args.json:
        mib = 1 / 2**20
        print(f"stages {result.stages}, delays {result.delays}")
        for r in result.history:
            print(f"  epoch {r['epoch']:3d}  train loss {r['train_loss']:.4f}  test loss {r['test_loss']:.4f}  "
                  f"test accuracy {100 * r['test_accuracy']:.2f}%  ({r['seconds']:.1f} s)")
        print(f"test accuracy {100 * result.test_accuracy:.2f}%  in {result.seconds:.1f} s")
        print(f"weight history held: {result.weight_history_bytes * mib:.3f} MiB "
              f"({result.weight_history_bytes / result.parameter_bytes:.2f} x |W|); "
              f"stash would hold {result.stash_bytes * mib:.3f} MiB ({result.stash_bytes / result.parameter_bytes:.2f} x |W|); "
              f"|W| = {result.parameter_bytes * mib:.3f} MiB")
        print(f"metrics: {run_dir / 'metrics.jsonl'}, curve: {run_dir / 'learning_curve.png'}")
    else:
        print(json.dumps(summary))
    return 0
