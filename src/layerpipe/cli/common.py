"""Arguments shared by the training subcommands (`train`, `compare`)."""
from __future__ import annotations

import argparse
import ast
import contextlib
from typing import Any

from layerpipe.errors import LayerpipeError
from layerpipe.plan import SCHEDULES
from layerpipe.training import LR_SCHEDULES, OPTIMIZERS, STAGE_LRS, TrainConfig
from layerpipe.weights import strategy_help


def add_training_arguments(p: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Model, data and optimisation flags. With `sweep`, --stages is left to the caller."""
    from layerpipe.models import MODEL_NAMES

    p.add_argument("--model", default="cnn1d", help=f"model from the zoo: {', '.join(MODEL_NAMES)} (default: cnn1d)")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the model's builder, repeatable: e.g. norm=false (cnn1d, snn), time_steps=8 (snn), "
                        "n_layer=6 (gpt); an unknown key lists the model's options")
    p.add_argument("--dataset", default=None, help="dataset (default: the model's own, e.g. mnist1d for cnn1d)")
    p.add_argument("--data-dir", default=None, help="folder holding downloaded datasets (CIFAR python-pickle folders)")
    p.add_argument("--samples", type=int, default=None, help="dataset size (MNIST-1D: total samples generated)")
    p.add_argument("--data-seed", type=int, default=42,
                   help="seed of dataset generation and splits, fixed across --seed (default 42, the published MNIST-1D)")
    if not sweep:
        p.add_argument("--stages", default="4",
                       help="K balanced stages, layers per stage like 2,1,3,1, or 'all' (one layer per stage); default 4")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="layerpipe: delay 2 S(k) ticks; pipedream: S(k) (1F1B timing: the gradient crosses a "
                        "boundary within its tick, half the delay and the activations) (default: the model's "
                        "recipe: pipedream for gpt, else layerpipe)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the model's recipe)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per update, and per microbatch unless --max-stale-samples splits it (default: the "
                        "model's recipe)")
    p.add_argument("--max-stale-samples", type=int, default=None, metavar="N",
                   help="pipelined runs: split each batch into microbatches (a divisor of --batch-size, never "
                        "below 1) so that the oldest gradient is at most N samples stale (largest delay x "
                        "microbatch), their gradients accumulated into one update; 0: one microbatch per batch "
                        "at every depth (default: the model's recipe when --batch-size is not given: 4 for gpt, "
                        "i.e. batches of 4 sequences whole at 2 stages, in 2 microbatches at 3 stages, in 4 "
                        "deeper; else 0)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="optimizer (default: the model's recipe)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's recipe)")
    p.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                   help="learning-rate schedule: cosine (decay to 0, per epoch), cosine-step (the same per "
                        "microbatch), constant (default: the model's recipe: cosine-step for gpt, else cosine)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear learning-rate warm-up (default 0)")
    p.add_argument("--stage-lr", default="same", choices=STAGE_LRS,
                   help="per-stage learning rate: same (default), or inverse-delay: lr / d_k on each stage with "
                        "gradient delay d_k > 0 (helps the transformer, see docs/results.md)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--sync-warmup", type=int, default=None, metavar="N",
                   help="train the first N microbatches without pipelining (each drained before the next "
                        "enters: no stale gradient while the loss falls fastest; default: the model's recipe, 0)")
    p.add_argument("--compensation", action="append", default=None, metavar="SPEC",
                   help="delay compensation, repeatable: NAME or NAME:KEY=VALUE,... e.g. nesterov, muon:lr=4e-3, "
                        "error-feedback:c=0.5, predict, accumulate, pipemare; 'none' for none "
                        "(default: the model's recipe). See layerpipe.compensate")
    p.add_argument("--fused-update", action="store_true",
                   help="run each stage's update (the weight strategy's copy or lerps of its buffer and the "
                        "optimizer step: sgd, adam, adamw) as one loop per tensor compiled by torch.compile: each "
                        "tensor read once per update; stages under 1 MiB of parameters stay unfused. Not with "
                        "--compensation; needs a C++ compiler; each stage's first update compiles (seconds, cached "
                        "on disk)")
    p.add_argument("--weight-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the weight strategy, repeatable: e.g. alpha=0.3 (ema)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (0: all cores; default: the model's recipe, 1 for small models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, **overrides) -> TrainConfig:
    fields = dict(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, samples=args.samples, data_seed=args.data_seed,
        stages=getattr(args, "stages", "4"), weights=getattr(args, "weights", "ema"), schedule=args.schedule,
        epochs=args.epochs, batch_size=args.batch_size,
        max_stale_samples=args.max_stale_samples, optimizer=args.optimizer, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs, stage_lr=args.stage_lr,
        momentum=args.momentum, weight_decay=args.weight_decay, seed=getattr(args, "seed", 0), device=args.device,
        threads=args.threads, model_options=parse_model_options(args.model_option, "--model-option"),
        weight_options=parse_model_options(args.weight_option, "--weight-option"),
        compensation=_compensation(args.compensation),
        sync_warmup=args.sync_warmup, fused_update=getattr(args, "fused_update", False),
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _compensation(items: list[str] | None) -> list[str] | None:
    """--compensation values: None (the recipe's), [] for 'none', else the specs given."""
    if items is None:
        return None
    return [] if [i.strip().lower() for i in items] == ["none"] else list(items)


def parse_model_options(items: list[str], flag: str = "--model-option") -> dict[str, Any]:
    """["norm=false", "channels=(16, 32)"] -> {"norm": False, "channels": (16, 32)}."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LayerpipeError(f"{flag} needs KEY=VALUE, got {item!r}")
        text = text.strip()
        if text.lower() in ("true", "false"):
            value: Any = text.lower() == "true"
        else:
            try:
                value = ast.literal_eval(text)  # numbers, tuples, quoted strings
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string
        options[key.strip()] = value
    return options


@contextlib.contextmanager
def signals_as_interrupt(enabled: bool = True, signals: tuple[str, ...] = ("SIGTERM", "SIGHUP"),
                         raise_as: type[BaseException] = KeyboardInterrupt):
    """`signals` (default SIGTERM and SIGHUP) end the command as Ctrl-C does (`raise_as`,
    KeyboardInterrupt by default, with the signal's name: the run folder is marked
    interrupted, one line, exit 130) instead of killing it silently mid-write. Only in the
    main thread; elsewhere a no-op."""
    import signal
    import threading

    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise raise_as(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (getattr(signal, name) for name in signals)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def strategies_help() -> str:
    """The --weights help, generated from the strategy registry."""
    return "sync: no pipelining, the reference; " + strategy_help()
