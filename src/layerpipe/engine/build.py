"""Stages from a plan: the modules of each stage and each stage's optimizer, strategy and hooks.

    stages = build_stages(sequential_modules(model, spec), spec, "ema", optimizer, loss_fn)

Both engines build their stages here (the single-process engine all of them, a process of
the distributed runtime its own), so a stage is the same object wherever it runs.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from layerpipe.compensate import attach_stage, build_optimizer
from layerpipe.compensate.muon import mark_io_matrices
from layerpipe.engine import fused
from layerpipe.engine.saved import TiedGrads
from layerpipe.engine.stage import LossFn, OptimizerFactory, SchedulerFactory, Stage
from layerpipe.plan import PipelineSpec
from layerpipe.weights import make_strategy

log = logging.getLogger(__name__)


def build_stages(
    modules: Sequence[nn.Module],
    spec: PipelineSpec,
    weights: str,
    optimizer: OptimizerFactory | None,
    loss_fn: LossFn,
    weight_options: Mapping[str, Any] | None = None,
    only: int | None = None,
    *,
    autocast: tuple[str, torch.dtype] | None = None,
    clip_grad_norm: float | None = None,
    lr_scheduler: SchedulerFactory | None = None,
    compensation: Sequence[Any] | None = None,
    fused_update: bool = False,
) -> list[Stage]:
    """One `Stage` per module (or only stage `only`), each with its optimizer and strategy.

    A parameter read by several modules is owned by the first (see `engine.stage`): its
    stage's optimizer holds it. With every stage here they are linked at once; with `only`
    (the distributed runtime) the caller links them (`engine.distributed.tied`). `compensation`:
    delay-compensation specs (`layerpipe.compensate`, e.g. ["predict"]) that build or wrap
    each stage's optimizer knowing the stage's delay. The model's embeddings and output matrix
    are tagged for `MuonAdamW` (`compensate.muon.mark_io_matrices`). `fused_update`: each
    stage's update in one compiled loop (`engine.fused`)."""
    options = dict(weight_options or {})
    last = spec.num_stages - 1
    mark_io_matrices(modules)  # Muon (if a stage's optimizer is one) leaves these to AdamW
    users = param_users(modules)
    by_id = {id(p): p for m in modules for p in m.parameters()}
    tied = {i: ks for i, ks in users.items() if len(ks) > 1}
    stages = []
    max_delay = max(spec.delays)  # for compensation rules set by the pipeline's depth
    for k in range(spec.num_stages):
        if only is not None and k != only:
            continue
        factory = optimizer
        if compensation:
            factory = functools.partial(build_optimizer, delay=spec.delays[k], specs=list(compensation), base=optimizer,
                                        max_delay=max_delay)
        owned = [p for p in modules[k].parameters() if p.requires_grad and users[id(p)][0] == k] if tied else None
        stages.append(Stage(k, modules[k], spec.delays[k], lambda ps, d, opt: make_strategy(weights, ps, d, opt, **options),
                            factory, is_last=k == last, loss_fn=loss_fn, owned=owned, autocast=autocast,
                            clip_grad_norm=clip_grad_norm, lr_scheduler=lr_scheduler, fused_update=fused_update))
    if compensation:
        for stage in stages:
            if stage.optimizer is not None:
                attach_stage(stage)
    if fused_update and stages and all(s.fused is None for s in stages if s.optimizer is not None):
        log.warning("fused_update: %s under %.0f MiB of parameters; the updates stay unfused (a compiled "
                    "call would cost more than it saves)", "the stage holds" if only is not None else "every stage holds",
                    fused.MIN_FUSED_BYTES / 2**20)
    if tied and only is None:
        grads = TiedGrads()
        owners = {i: stages[ks[0]] for i, ks in tied.items()}
        for s in stages:
            s.link_tied(owners, grads, [by_id[i] for i, ks in tied.items() if ks[0] == s.index])
    return stages


def param_users(modules: Sequence[nn.Module]) -> dict[int, list[int]]:
    """id(parameter) -> the stages whose module reads it (trainable parameters only), in
    stage order: the first is its owner."""
    users: dict[int, list[int]] = {}
    for k, m in enumerate(modules):
        for p in m.parameters():
            if p.requires_grad:
                users.setdefault(id(p), []).append(k)
    return users


def sequential_modules(model: nn.Sequential, spec: PipelineSpec) -> list[nn.Module]:
    """The stages of an nn.Sequential as slices (sharing the model's layers)."""
    return [model[a:b] for a, b in spec.bounds()]
