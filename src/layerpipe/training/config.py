"""What one training run is: `TrainConfig`, validated on construction, and the zoo's recipes.

    config = TrainConfig(model="cnn1d", stages="4", weights="ema")   # None fields: the recipe
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from layerpipe.errors import LayerpipeError
from layerpipe.plan import SCHEDULES, parse_stages
from layerpipe.weights import strategy_names
from layerpipe.weights.registry import check_options

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "constant", "cosine-step")
#: per-stage learning rate: "same" for every stage, or "inverse-delay": lr / d_k on stages
#: with a gradient delay d_k > 0 (PipeMare's observation: a stale gradient wants a smaller step)
STAGE_LRS = ("same", "inverse-delay")

#: per-model training recipes used when the user does not override them
# (threads: torch intra-op threads; 1 for the small models, whose kernels are too small to
# split and which slow down up to 5x on 2 threads when another process shares the cores)
RECIPES: dict[str, dict[str, Any]] = {
    "mlp": dict(epochs=40, batch_size=64, optimizer="adam", lr=1e-3, threads=1),
    "cnn1d": dict(epochs=30, batch_size=64, optimizer="adam", lr=2e-3, threads=1),
    "resnet18": dict(epochs=5, batch_size=64, optimizer="sgd", lr=0.05, threads=0),
    "snn": dict(epochs=25, batch_size=64, optimizer="adam", lr=3e-3, threads=1),
    # the transformer: Muon on the hidden matrices (AdamW on the rest) at 1.6e-2, momentum 0.9
    # (sync's best), a per-microbatch cosine after a linear warm-up (8 updates for sync, 120
    # ticks for a pipeline: each measured best), PipeMare's lr / d_k on the delayed stages for
    # the whole run and 1.25x sync's lr on every stage of a pipeline (with microbatches of 1
    # the lr / d_k alone is too cautious; sync itself is worse at 1.25x) (not on the AdamW
    # part: embeddings, vectors, output layer, at the full lr),
    # less momentum there, set by depth (0.5 at 4 stages: a delay acts as momentum already;
    # 0.9, no less, at 8), the 1F1B timing (delays S(k), half LayerPipe's 2 S(k)), and
    # batches of 4 sequences per update (sync's best on the default data), in a pipeline split
    # into microbatches so that no gradient is more than one batch (4 sequences) stale (1 at 4
    # and 8 stages, 2 at 3), their gradients accumulated into one update: the best measured
    # recipe, synchronous and pipelined (docs/results.md, "Transformer")
    "gpt": dict(epochs=2, batch_size=4, optimizer="adamw", lr=1.6e-2, threads=0, lr_schedule="cosine-step",
                schedule="pipedream", max_stale_samples=4,
                compensation=["muon:momentum=0.9,delayed_momentum=depth",
                              "pipemare:anneal=never,warmup=8,pipeline_warmup=120,pipeline_lr=1.25,adamw=full"]),
}
_FALLBACK_RECIPE = dict(epochs=10, batch_size=32, optimizer="adam", lr=1e-3, threads=0)
#: settings every recipe has unless it says otherwise
_RECIPE_DEFAULTS = dict(compensation=[], sync_warmup=0, lr_schedule="cosine", schedule="layerpipe",
                        max_stale_samples=0)


def recipe(model: str) -> dict[str, Any]:
    """Every setting the model's recipe gives (what a `TrainConfig` field left None becomes)."""
    return {**_RECIPE_DEFAULTS, **RECIPES.get(model, _FALLBACK_RECIPE)}

#: the settings a checkpoint must agree on to be resumed (they change what the state means)
RESUME_KEYS = ("sync_warmup", "model", "model_options", "dataset", "samples", "data_seed", "stages", "weights", "schedule",
               "seed", "batch_size", "max_stale_samples", "optimizer", "compensation", "weight_options")


def weight_choices() -> list[str]:
    """What `--weights` accepts: `sync` (ordinary training) and every registered strategy."""
    return ["sync", *strategy_names()]


@dataclass
class TrainConfig:
    """One training run. `None` fields take the model's recipe (see RECIPES)."""

    model: str = "cnn1d"
    #: dataset name; None: the model's default dataset
    dataset: str | None = None
    #: "K" (K balanced stages), "2,1,3,1" (layers per stage) or "all" (one layer per stage)
    stages: str = "4"
    #: `sync` (no pipelining) or a registered weight strategy
    weights: str = "ema"
    #: "layerpipe" (delays 2 S(k)) or "pipedream" (S(k), 1F1B timing); None: the recipe's
    schedule: str | None = None
    epochs: int | None = None
    #: samples per update (per replica with data parallelism), and per microbatch unless
    #: `max_stale_samples` splits it; see `microbatch`
    batch_size: int | None = None
    #: a pipelined run's microbatch is `batch_size` or a divisor of it, so that its oldest
    #: gradient is at most this many samples stale (largest delay x global microbatch), and
    #: the gradients of batch_size / microbatch microbatches make one update (`accumulation`);
    #: 0: microbatch `batch_size` at every depth. None: the recipe's where `batch_size` is
    #: too, else 0 (a batch the user gives is kept)
    max_stale_samples: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    #: "cosine": lr decays to 0 over the run with a cosine, per epoch; "cosine-step": the
    #: same cosine, per microbatch; "constant"
    lr_schedule: str | None = None
    #: epochs of linear learning-rate warm-up (PipeMare: stale gradients hurt most early)
    warmup_epochs: int = 0
    #: "same" or "inverse-delay" (see STAGE_LRS)
    stage_lr: str = "same"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    #: seed of dataset generation and splits, kept fixed across --seed so that runs over
    #: seeds compare on the same data (42: the published MNIST-1D)
    data_seed: int = 42
    device: str = "cpu"
    #: torch intra-op threads (0: torch's default, all cores); None: the model's recipe
    threads: int | None = None
    #: dataset size (MNIST-1D: total samples generated); None: the dataset's default
    samples: int | None = None
    data_dir: str | None = None
    #: keyword options of the model's builder, e.g. {"norm": False}
    model_options: dict[str, Any] = field(default_factory=dict)
    #: keyword options of the weight strategy, e.g. {"alpha": 0.3} for ema
    weight_options: dict[str, Any] = field(default_factory=dict)
    #: microbatches at the start of the run trained without pipelining: each one drained
    #: before the next enters, so no gradient is stale while the loss falls fastest
    sync_warmup: int | None = None
    #: delay compensation (`layerpipe.compensate` specs, e.g. ["nesterov", "predict:c=0.5"]);
    #: None: the model's recipe; [] none
    compensation: list[str] | None = None
    #: each stage's update (the weight strategy's passes and the SGD step) as one compiled
    #: loop per tensor (`layerpipe.engine.fused`); without compensation only
    fused_update: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.max_stale_samples is None:
            self.max_stale_samples = 0  # the user's microbatch, at every depth
        for key, value in recipe(self.model).items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        from layerpipe.compensate import check_specs

        if self.sync_warmup < 0:
            raise LayerpipeError(f"--sync-warmup must be >= 0, got {self.sync_warmup}")
        check_specs(self.compensation)  # one line for an unknown technique or a bad option, now
        _choice("weight strategy", self.weights, weight_choices())
        if self.weight_options:
            check_options("latest" if self.weights == "sync" else self.weights, self.weight_options)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("--stage-lr", self.stage_lr, STAGE_LRS)
        _choice("--lr-schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise LayerpipeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr or not self.lr > 0 or self.lr == float("inf"):
            raise LayerpipeError(f"--lr must be a positive number, got {self.lr}")
        parse_stages(self.stages)
        if self.fused_update and self.compensation:
            raise LayerpipeError(f"--fused-update fuses the optimizer's own step; --compensation "
                                 f"{','.join(self.compensation)} wraps it (give --compensation none)")
        from layerpipe.training.validate import check_config

        check_config(self)

    def microbatch(self, max_delay: int, replicas: int = 1) -> int:
        """Samples per microbatch and replica for a pipeline whose largest gradient delay is
        `max_delay` ticks: `batch_size`, or with `max_stale_samples` the largest divisor of it
        whose oldest gradient is at most that many samples stale (never below 1)."""
        if not self.max_stale_samples or max_delay <= 0:
            return self.batch_size
        bound = self.max_stale_samples // (max_delay * replicas)
        return max(d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0 and (d <= bound or d == 1))

    def accumulation(self, max_delay: int, replicas: int = 1) -> int:
        """Microbatches whose gradients make one update: batch_size / microbatch, so that a
        smaller microbatch keeps the batch per update (and is no more stale in updates)."""
        return self.batch_size // self.microbatch(max_delay, replicas)

    def run_compensation(self, max_delay: int, replicas: int = 1) -> list[str]:
        """The compensation specs a run with these delays builds: the configured ones, and the
        gradient accumulation of `accumulation` (innermost: see `layerpipe.compensate`)."""
        every = self.accumulation(max_delay, replicas)  # an accumulate of the user's is refused on construction
        return [*self.compensation, f"accumulate:every={every}"] if every > 1 else list(self.compensation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(what: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise LayerpipeError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
