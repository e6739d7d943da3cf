"""Checks of the `Pipeline` constructor's arguments and of its first microbatch.

Everything here runs once (at construction, or on the first `step`), never per tick: a
wrong argument ends in a `LayerpipeError` subclass naming it, not in a stack trace from deep
inside a tick (or, worse, in a pipeline that trains nothing).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from layerpipe.errors import LayerpipeError, PlanError


class PipelineArgumentError(LayerpipeError, TypeError):
    """An argument of `Pipeline` has the wrong type or value."""


class PipelineInputError(LayerpipeError, ValueError):
    """A microbatch (or the model's layers on it) cannot run: shapes, dtypes or devices differ."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_arguments(model: Any, stages: Any, weights: Any, optimizer: Any, loss_fn: Any, schedule: Any,
                    delays: Any, weight_options: Any) -> None:
    if not isinstance(model, nn.Sequential):
        raise PlanError(f"the model must be an nn.Sequential of layers, got {type(model).__name__}")
    if len(model) == 0:
        raise PlanError("the model has no layers")
    if stages is not None and not _is_int(stages):
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not all(_is_int(s) for s in stages):
            raise PipelineArgumentError(f"stages must be an int K, a sequence of layer counts per stage, or None; "
                                        f"got {_short(stages)}")
    if not isinstance(weights, str):
        raise PipelineArgumentError(f"weights must be a strategy name (str), got {_short(weights)}")
    if not isinstance(schedule, str):
        raise PipelineArgumentError(f"schedule must be a name (str), got {_short(schedule)}")
    if loss_fn is None or not callable(loss_fn):
        raise PipelineArgumentError(f"loss_fn must be a callable loss_fn(output, target), got {_short(loss_fn)}")
    if isinstance(optimizer, torch.optim.Optimizer):
        raise PipelineArgumentError("optimizer must be a factory (lambda params: torch.optim.SGD(params, ...)), "
                                    "not an optimizer: each stage needs its own")
    if optimizer is not None and not callable(optimizer):
        raise PipelineArgumentError(f"optimizer must be a factory called with a stage's parameters, got {_short(optimizer)}")
    if delays is not None and (isinstance(delays, (str, bytes)) or not isinstance(delays, Sequence)
                               or not all(_is_int(d) and d >= 0 for d in delays)):
        raise PipelineArgumentError(f"delays must be a sequence of non-negative ints, got {_short(delays)}")
    if weight_options is not None and not isinstance(weight_options, Mapping):
        raise PipelineArgumentError(f"weight_options must be a mapping, got {_short(weight_options)}")


def checked_optimizer(factory: Callable[[list[nn.Parameter]], Any]) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The factory, with its result checked (it is called once per stage, at construction)."""

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = factory(params)
        # a torch optimizer, or anything that steps like one (a delay compensation wrapping one)
        if not isinstance(opt, torch.optim.Optimizer) and not (callable(getattr(opt, "step", None))
                                                                 and hasattr(opt, "param_groups")):
            raise PipelineArgumentError(f"the optimizer factory returned {type(opt).__name__}, not a "
                                        "torch.optim.Optimizer (did the lambda forget to return it?)")
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        if not all(id(p) in held for p in params):
            raise PipelineArgumentError("the optimizer factory's optimizer does not hold the parameters it was given")
        return opt

    return make


def check_first_batch(model: nn.Sequential, loss_fn: Callable, x: Any, y: Any) -> None:
    """Run the first microbatch through every layer once (no gradients, evaluation mode, so
    that no running statistics or random state change) and the loss on it: a layer whose
    input does not fit the previous layer's output, a wrong dtype or device, or a loss that
    is not a scalar is named here."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise PipelineInputError(f"step(x, y) takes tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise PipelineInputError(f"x and y must share their first (batch) dimension, got {tuple(x.shape)} and "
                                 f"{tuple(y.shape)}")
    param = next((p for p in model.parameters()), None)
    if param is not None:
        if x.device != param.device:
            raise PipelineInputError(f"x is on {x.device}, the model on {param.device}")
        if x.is_floating_point() and param.is_floating_point() and x.dtype != param.dtype:
            raise PipelineInputError(f"x is {x.dtype}, the model's parameters are {param.dtype}; convert one of them")
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            h = x
            for i, layer in enumerate(model):
                try:
                    h = layer(h)
                except Exception as exc:
                    shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                    before = "the input" if i == 0 else f"the output of layer {i - 1}"
                    raise PipelineInputError(f"layer {i} ({type(layer).__name__}) cannot take {before}, shaped {shape}"
                                             f" ({getattr(h, 'dtype', '?')}): {_first_line(exc)}") from None
            try:
                loss = loss_fn(h, y)
            except Exception as exc:
                raise PipelineInputError(f"loss_fn cannot take the model's output {tuple(h.shape)} and y "
                                         f"{tuple(y.shape)} ({y.dtype}): {_first_line(exc)}") from None
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise PipelineInputError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def _short(v: Any) -> str:
    """A value for a one-line message: its repr when short and on one line, else its type."""
    text = repr(v)
    return text if len(text) <= 80 and "\n" not in text else type(v).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(v: Any) -> str:
    return f"a tensor shaped {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
