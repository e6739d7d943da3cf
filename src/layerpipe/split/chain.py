"""Reference forward and backward through cut stages: the protocol a pipeline engine runs.

Each stage runs on detached copies of the previous stage's outputs (leaves that require a
gradient when the value did); backward goes from the last stage to the first, each stage
taking the gradients of its outputs and returning those of its inputs. Values that need no
gradient (an attention mask, token ids) send none back. Weight gradients are collected per
stage: a parameter read by several stages (tied embeddings) gets one gradient from each,
and their sum is the model's gradient.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from layerpipe.split.model import SplitModel


@dataclass
class ChainResult:
    loss: Tensor
    output: Any  # what the last stage (and the model) returned
    #: per stage, canonical parameter name -> gradient of that stage's use of it
    stage_grads: list[dict[str, Tensor]] = field(default_factory=list)

    def summed_grads(self) -> dict[str, Tensor]:
        """Gradient per parameter summed over the stages that use it."""
        out: dict[str, Tensor] = {}
        for grads in self.stage_grads:
            for name, g in grads.items():
                out[name] = out[name] + g if name in out else g
        return out


def _leaf(v: Any) -> Any:
    if not isinstance(v, Tensor):
        return v
    leaf = v.detach()
    if v.requires_grad:
        leaf.requires_grad_(True)
    return leaf


def run_chained(
    split: SplitModel,
    args: tuple,
    kwargs: dict | None,
    loss_fn: Callable[[Any], Tensor],
) -> ChainResult:
    """Forward through every stage with the autograd graph cut at each boundary, then the
    backward stage by stage from the last. `loss_fn` receives the last stage's output."""
    inputs: list[tuple[Any, ...]] = []
    outputs: list[Any] = []
    out: Any = None
    for k, stage in enumerate(split.stages):
        if k == 0:
            ins: tuple[Any, ...] = ()
            out = stage(*args, **(kwargs or {}))
        else:
            ins = tuple(_leaf(v) for v in out)
            out = stage(*ins)
        inputs.append(ins)
        outputs.append(out)
    loss = loss_fn(out)
    stage_grads: list[dict[str, Tensor]] = [{} for _ in split.stages]
    grad_out: tuple[Tensor | None, ...] = ()
    for k in range(split.num_stages - 1, -1, -1):
        if k == split.num_stages - 1:
            roots, seeds = [loss], [None]
        else:
            pairs = [(o, g) for o, g in zip(outputs[k], grad_out) if g is not None and o.requires_grad]
            roots, seeds = [o for o, _ in pairs], [g for _, g in pairs]
        named = [(n, p) for n, p in split.stage_parameters(k) if p.requires_grad]
        wrt_in = [i for i, v in enumerate(inputs[k]) if isinstance(v, Tensor) and v.requires_grad]
        wrt = [p for _, p in named] + [inputs[k][i] for i in wrt_in]
        grads = torch.autograd.grad(roots, wrt, seeds, allow_unused=True) if roots and wrt else [None] * len(wrt)
        stage_grads[k] = {n: g for (n, _), g in zip(named, grads[: len(named)]) if g is not None}
        back: list[Tensor | None] = [None] * len(inputs[k])
        for i, g in zip(wrt_in, grads[len(named) :]):
            back[i] = g
        grad_out = tuple(back)
    return ChainResult(loss.detach(), outputs[-1], stage_grads)
