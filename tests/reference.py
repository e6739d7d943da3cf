"""Independent references the engine is tested against (no layerpipe code in here).

`delayed_sgd` is a hand-written simulation of delayed SGD with explicit weight histories:
stage k applies, at tick m + k + d_k, the gradient of microbatch m's loss evaluated at the
point (W_0 at tick m, W_1 at tick m+1, ..., W_{K-1} at tick m+K-1), computed by autograd on
one composite functional forward. `plain_training` is the ordinary PyTorch loop.
"""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call


def plain_training(model, batches, optimizer_factory, loss_fn, epochs=1):
    opt = optimizer_factory(list(model.parameters()))
    losses = []
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def delayed_sgd(model, stage_sizes, delays, batches, optimizer_factory, loss_fn):
    """Train a deep copy of `model`; return (trained copy, losses in microbatch order)."""
    model = copy.deepcopy(model)
    bounds, start = [], 0
    for n in stage_sizes:
        bounds.append((start, start + n))
        start += n
    modules = [model[a:b] for a, b in bounds]
    params = [dict(m.named_parameters()) for m in modules]
    opts = [optimizer_factory(list(p.values())) if p else None for p in params]
    K, M = len(modules), len(batches)
    history: list[list[dict]] = [[] for _ in range(K)]  # history[k][t]: W_k at the start of tick t
    losses = {}
    t = 0
    while True:
        for k in range(K):
            history[k].append({n: p.detach().clone() for n, p in params[k].items()})
        due = [(k, t - k - delays[k]) for k in range(K) if 0 <= t - k - delays[k] < M]
        if not due and t >= M + K + max(delays):
            break
        for k, m in due:
            x, y = batches[m]
            point = [{n: w.clone().requires_grad_(True) for n, w in history[j][m + j].items()} for j in range(K)]
            h = x
            for j in range(K):
                h = functional_call(modules[j], point[j], (h,))
            loss = loss_fn(h, y)
            losses[m] = loss.item()
            names = list(point[k])
            if not names:  # a stage without parameters has nothing to update
                continue
            grads = torch.autograd.grad(loss, [point[k][n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                params[k][n].grad = g
            opts[k].step()
            for p in params[k].values():
                p.grad = None
        t += 1
    return model, [losses[m] for m in range(M)]


class AccumulatingOptimizer:
    """Hand-written gradient accumulation around an optimizer: `step` adds the parameters'
    gradients to its own sum and, every `every` calls, steps the inner optimizer on their mean."""

    def __init__(self, params, inner, every):
        self.params, self.inner, self.every = list(params), inner, every
        self.sum, self.count = None, 0

    def step(self):
        grads = [p.grad.detach().clone() for p in self.params]
        self.sum = grads if self.sum is None else [a + b for a, b in zip(self.sum, grads)]
        self.count += 1
        if self.count == self.every:
            for p, s in zip(self.params, self.sum):
                p.grad = s / self.every
            self.inner.step()
            self.sum, self.count = None, 0
