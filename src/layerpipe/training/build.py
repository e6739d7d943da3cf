"""From a config to the things a run needs: the model, the data, the loss, the optimizers."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from layerpipe.errors import LayerpipeError
from layerpipe.plan import parse_stages
from layerpipe.training.config import TrainConfig

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def split_blocks(model: nn.Sequential) -> nn.Sequential:
    """The same network with every nested `nn.Sequential` block replaced by its layers (same
    module objects, same parameters), so that it can be cut into more stages."""
    layers: list[nn.Module] = []
    for block in model:
        layers.extend(split_blocks(block) if isinstance(block, nn.Sequential) else [block])
    return nn.Sequential(*layers)


def make_optimizer_factory(config: TrainConfig) -> OptimizerFactory:
    """The factory the engine calls once per stage with that stage's parameters."""
    name, lr, wd = config.optimizer, float(config.lr), config.weight_decay

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)

    return factory


def build(config: TrainConfig):
    """Model, dataset and loss for a config, seeded: (model, dataset, loss_fn). The model is
    on `config.device`."""
    from layerpipe.data import load_dataset, loss_fn
    from layerpipe.models import build_model, default_dataset

    if config.dataset is None:
        config.dataset = default_dataset(config.model)
    data = load_dataset(config.dataset, data_dir=config.data_dir, samples=config.samples, seed=config.data_seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=data.num_classes, input_shape=tuple(data.input_shape),
                        **config.model_options)
    stages = parse_stages(config.stages)
    wanted = stages if isinstance(stages, int) else len(stages) if stages else 0
    if wanted > len(model):
        # deeper pipelines than the model has blocks: split the blocks into their layers
        model = split_blocks(model)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LayerpipeError("--device cuda was asked for but no CUDA device is available")
    return model.to(device), data, loss_fn(data.task)


@torch.no_grad()
def evaluate(model: nn.Module, x: Any, y: Any, loss_fn, batch_size: int = 512,
             call: Callable[..., Any] | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on (x, y); for sequences, accuracy per token. Inputs
    a tensor, a tuple or a dict of keyword tensors; `call` runs the model in another form (a
    `layerpipe.split.SplitModel`: its stages in order). The accuracy is NaN when the output is
    not a tensor of class scores."""
    from layerpipe.engine.batch import accuracy_counts, as_call, num_samples, take, to_device

    call = call or model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    num = num_samples(y)
    total_loss, correct, count, scored = 0.0, 0, 0, True
    try:
        for s in range(0, num, batch_size):
            m = min(batch_size, num - s)
            args, kwargs = as_call(to_device(take(x, slice(s, s + m)), device))
            out = call(*args, **kwargs)
            yb = to_device(take(y, slice(s, s + m)), device)
            total_loss += float(loss_fn(out, yb)) * m
            counts = accuracy_counts(out, yb)
            scored = scored and counts is not None
            if counts is not None:
                correct, count = correct + counts[0], count + counts[1]
    finally:
        model.train(was_training)
    return total_loss / num, (correct / count if scored and count else float("nan"))


def evaluate_split(split, x, y, loss_fn, batch_size: int = 512) -> tuple[float, float]:
    """`evaluate` of a model cut by `layerpipe.split`, its stages run in order (as the
    distributed runtime runs them)."""
    return evaluate(split.model, x, y, loss_fn, batch_size, call=split)


def epoch_order(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index tensors of the epoch's microbatches: a permutation seeded by (seed, epoch), the
    same in every process. The last, smaller batch is kept."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    return list(perm.split(batch_size))
