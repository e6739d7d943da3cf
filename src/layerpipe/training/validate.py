"""Checks of a `TrainConfig` beyond its choices (called from `TrainConfig.__post_init__`):
every value a run would only trip over later (a device torch cannot parse, negative threads,
a model that cannot read the dataset, a model option of the wrong type) is refused here, in
one line, before anything is built."""
from __future__ import annotations

import math
from typing import Any

from layerpipe.compensate import parse_spec
from layerpipe.errors import LayerpipeError


#: the model and dataset name of a run on the user's own model and data
CUSTOM = "custom"


def check_config(config: Any) -> None:
    _check_numbers(config)
    _check_device(config.device)
    _check_model_and_data(config)


def _finite(name: str, value: Any, *, minimum: float | None = None, below: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LayerpipeError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise LayerpipeError(f"{name} must be at least {minimum:g}, got {value!r}")
    if below is not None and value >= below:
        raise LayerpipeError(f"{name} must be below {below:g}, got {value!r}")


def _check_numbers(c: Any) -> None:
    _finite("--momentum", c.momentum, minimum=0, below=1)
    _finite("--weight-decay", c.weight_decay, minimum=0)
    for name in ("epochs", "batch_size", "warmup_epochs", "seed", "data_seed"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise LayerpipeError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
    if isinstance(c.max_stale_samples, bool) or not isinstance(c.max_stale_samples, int) or c.max_stale_samples < 0:
        raise LayerpipeError(f"--max-stale-samples must be 0 (off) or a positive integer, got {c.max_stale_samples!r}")
    if c.max_stale_samples and any(parse_spec(str(spec))[0] == "accumulate" for spec in c.compensation):
        raise LayerpipeError(f"--max-stale-samples {c.max_stale_samples} accumulates the microbatches of a split batch "
                             "already; drop the accumulate compensation or pass --max-stale-samples 0")
    if c.warmup_epochs < 0:
        raise LayerpipeError(f"--warmup-epochs must be 0 or more, got {c.warmup_epochs}")
    if c.seed < 0 or c.data_seed < 0:
        raise LayerpipeError(f"--seed and --data-seed must be 0 or more, got {c.seed} and {c.data_seed}")
    if c.threads is not None and (isinstance(c.threads, bool) or not isinstance(c.threads, int) or c.threads < 0):
        raise LayerpipeError(f"--threads must be 0 (all cores) or a positive number, got {c.threads!r}")
    if c.samples is not None and (isinstance(c.samples, bool) or not isinstance(c.samples, int) or c.samples < 1):
        raise LayerpipeError(f"--samples must be a positive number, got {c.samples!r}")


def _check_device(device: Any) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LayerpipeError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise LayerpipeError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LayerpipeError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LayerpipeError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def _check_model_and_data(c: Any) -> None:
    from layerpipe.data import DATASET_NAMES
    from layerpipe.models import MODEL_NAMES, check_model_options, default_dataset

    if c.model == CUSTOM:  # the user's own model and data (`train(custom=...)`, `layerpipe.train_pipeline`)
        if not isinstance(c.model_options, dict) or not isinstance(c.weight_options, dict):
            raise LayerpipeError("model_options and weight_options must be dicts")
        return
    if c.model not in MODEL_NAMES:
        raise LayerpipeError(f"unknown model {c.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if c.dataset is not None:
        if c.dataset not in DATASET_NAMES:
            raise LayerpipeError(f"unknown dataset {c.dataset!r}; choose one of: {', '.join(DATASET_NAMES)}")
        text_model, text_data = default_dataset(c.model) == "text", c.dataset == "text"
        if text_model != text_data:
            fits = "text" if text_model else ", ".join(d for d in DATASET_NAMES if d != "text")
            raise LayerpipeError(f"model {c.model!r} cannot train on dataset {c.dataset!r} "
                                 f"({'byte sequences' if text_data else 'feature vectors or images'}); it takes: {fits}")
    if not isinstance(c.model_options, dict) or not isinstance(c.weight_options, dict):
        raise LayerpipeError("model_options and weight_options must be dicts")
    check_model_options(c.model, c.model_options)
