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


def _split_copy(model, stage_sizes, optimizer_factory):
    """A deep copy of `model`, its stages (slices of `stage_sizes` layers), their parameters by
    name and one optimizer per stage with parameters."""
    model = copy.deepcopy(model)
    bounds, start = [], 0
    for n in stage_sizes:
        bounds.append((start, start + n))
        start += n
    stages = [model[a:b] for a, b in bounds]
    params = [dict(s.named_parameters()) for s in stages]
    opts = [optimizer_factory(list(p.values())) if p else None for p in params]
    return model, stages, params, opts


def delayed_sgd(model, stage_sizes, delays, batches, optimizer_factory, loss_fn):
    """Train a deep copy of `model`; return (trained copy, losses in microbatch order)."""
    model, modules, params, opts = _split_copy(model, stage_sizes, optimizer_factory)
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


def _mlp_forward(stage, x):
    """Forward of a stage of nn.Linear / nn.Tanh layers; returns (output, per-layer inputs)."""
    inputs, h = [], x
    for layer in stage:
        inputs.append(h)
        h = layer(h)
    return h, inputs


def _mlp_backward(stage, inputs, g, weights):
    """Hand-written backward of `_mlp_forward`: the activations are the forward's, each Linear's
    input gradient uses `weights[name]` (the backward's weights). Returns (input grad, {name: grad})."""
    grads = {}
    for (key, layer), x in reversed(list(zip(stage._modules.items(), inputs))):
        if isinstance(layer, torch.nn.Tanh):
            y = torch.tanh(x)
            g = g * (1 - y * y)
        elif isinstance(layer, torch.nn.Linear):
            grads[f"{key}.weight"] = g.t() @ x
            grads[f"{key}.bias"] = g.sum(0)
            g = g @ weights[f"{key}.weight"]
        else:
            raise TypeError(f"the reference knows Linear and Tanh only, not {type(layer).__name__}")
    return g, grads


def delayed_sgd_rebuilt(model, stage_sizes, delays, batches, optimizer_factory, loss_fn, alphas=None, every=1,
                        live_weights=False):
    """Delayed SGD whose backward runs on LayerPipe2's reconstruction, written out plainly for an
    MLP of Linear and Tanh layers: stage k's backward of microbatch m, at tick m + k + d_k, uses
    the activations of its forward (at tick m + k) and, for each weight, W_now - n * u_hat: n the
    updates stage k applied since that forward, u the EMA (decay alpha_k = 2 / (D_k + 1) unless
    `alphas` says otherwise, D_k = ceil(d_k / every) the delay in updates) of the updates it
    applied, started at 0, u_hat = u / (1 - (1 - alpha)^s) after s updates. With `every` > 1 a
    stage sums the gradients of `every` backwards and updates with their mean on the last (the
    other backwards change nothing and are no update). Same tick semantics as `delayed_sgd`.
    With `live_weights` every backward uses the weights as they are at its tick, with no
    correction (`latest`). Returns (trained copy, losses)."""
    model, stages, params, opts = _split_copy(model, stage_sizes, optimizer_factory)
    alphas = alphas or [2.0 / (-(-d // every) + 1) for d in delays]
    summed: list[dict | None] = [None] * len(stages)  # per stage: the gradients summed so far
    count = [0] * len(stages)
    K, M = len(stages), len(batches)
    updates = [0] * K  # updates applied so far, per stage
    avg = [{n: torch.zeros_like(p) for n, p in params[k].items()} for k in range(K)]
    fwd_version: dict[tuple[int, int], int] = {}
    acts: dict[tuple[int, int], list] = {}
    outs: dict[tuple[int, int], torch.Tensor] = {}
    grad_in: dict[tuple[int, int], torch.Tensor] = {}
    losses = {}
    t = 0
    with torch.no_grad():
        while True:
            # forwards of this tick, on the weights at its start (before its updates)
            for k in range(K):
                m = t - k
                if 0 <= m < M:
                    x = batches[m][0] if k == 0 else outs[(m, k - 1)]
                    outs[(m, k)], acts[(m, k)] = _mlp_forward(stages[k], x)
                    fwd_version[(m, k)] = updates[k]
            due = [(k, t - k - delays[k]) for k in range(K) if 0 <= t - k - delays[k] < M]
            if not due and t >= M + K + max(delays):
                break
            for k, m in sorted(due, reverse=True):  # a later stage's backward feeds an earlier one's
                if k == K - 1:
                    logits = outs[(m, k)].detach().requires_grad_(True)
                    with torch.enable_grad():
                        loss = loss_fn(logits, batches[m][1])
                        (g,) = torch.autograd.grad(loss, [logits])
                    losses[m] = loss.item()
                else:
                    g = grad_in.pop((m, k + 1))
                n, s, a = updates[k] - fwd_version[(m, k)], updates[k], alphas[k]
                if n and s and not live_weights:
                    correction = 1 - (1 - a) ** s
                    weights = {name: p - n * avg[k][name] / correction for name, p in params[k].items()}
                else:
                    weights = {name: p.clone() for name, p in params[k].items()}
                g_in, grads = _mlp_backward(stages[k], acts.pop((m, k)), g, weights)
                grad_in[(m, k)] = g_in
                if not params[k]:
                    continue
                summed[k] = grads if summed[k] is None else {n: summed[k][n] + g for n, g in grads.items()}
                count[k] += 1
                if count[k] < every:
                    continue
                grads, summed[k], count[k] = {n: g / every for n, g in summed[k].items()}, None, 0
                before = {name: p.clone() for name, p in params[k].items()}
                for name, p in params[k].items():
                    p.grad = grads[name]
                with torch.enable_grad():
                    opts[k].step()
                for name, p in params[k].items():
                    p.grad = None
                    avg[k][name] = (1 - a) * avg[k][name] + a * (p - before[name])
                updates[k] += 1
            t += 1
    return model, [losses[m] for m in range(M)]
