"""Spiking 1-D convolutional network: leaky integrate-and-fire (LIF) neurons trained with a
surrogate gradient, in plain PyTorch (no snntorch).

    model = build_snn(time_steps=4)        # input (B, 40), logits (B, 10)
    logits = model(torch.randn(8, 40))

Every block but the last maps a (T, B, C, L) tensor of spikes over all T time steps to the
next one, so any contiguous split into stages is valid:

    0  encoder  Conv1d(1, C0, k=5) + BN on the analog input (once: it is the same at
                every step), repeated over T steps ("direct encoding"), then LIF
                -> (T, B, C0, 40)
    1.. conv    Conv1d(stride 2) + BN on all T*B frames at once, then LIF over time
    n  readout  Flatten + Linear per step, averaged over the T steps -> logits (B, classes)

BatchNorm over all T*B frames (`norm=True`, the default; tdBN of Zheng et al. 2021 without
its threshold scaling) keeps every layer's input currents at a fixed scale, so that firing
rates survive weight updates. This is what makes the network trainable with stale
gradients: with the recipe of `layerpipe.training.RECIPES` (Adam lr 3e-3, 25 epochs; seeds
0-2, docs/results.md) exact stashing at 4 stages reaches 93.1% with it and 73.7% without,
while sync training loses a little to it (92.7% with, 94.0% without).

LIF neuron, per step t:  v <- beta * v + I_t;  s_t = H(v - threshold);  v <- v - s_t * threshold
(soft reset). H has zero derivative almost everywhere, so backward uses the arctan surrogate
dH/dv ~ (alpha / 2) / (1 + (pi / 2 * alpha * (v - threshold))^2). The reset is detached from
the graph, as is usual (spikingjelly's `detach_reset`): gradients flow through the membrane
only.

The threshold 0.5 (not 1.0) keeps the deeper layers firing at initialisation when
`norm=False`: without BatchNorm, plain SGD (lr 0.05, momentum 0.9, 20 epochs) reached 93.1%
with it and 84.1% with threshold 1.0 (seed 0).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerpipe.errors import PlanError


class _ArctanSpike(torch.autograd.Function):
    """Heaviside step forward, arctan surrogate derivative backward.

    Written with `setup_context` so that it also works under torch.func transforms."""

    @staticmethod
    def forward(v: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        return (v > 0).to(v.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        v, alpha = inputs
        ctx.save_for_backward(v)
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (v,) = ctx.saved_tensors
        a = ctx.alpha
        return grad * (a / 2) / (1 + (math.pi / 2 * a * v).square()), None


def spike(v: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """H(v) with the arctan surrogate gradient of sharpness `alpha`."""
    return _ArctanSpike.apply(v, alpha)


class LIF(nn.Module):
    """Leaky integrate-and-fire neurons over time: (T, B, ...) input currents -> (T, B, ...) spikes."""

    def __init__(self, beta: float = 0.9, threshold: float = 0.5, alpha: float = 2.0) -> None:
        super().__init__()
        self.beta, self.threshold, self.alpha = float(beta), float(threshold), float(alpha)

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(current[0])
        spikes = []
        for i_t in current.unbind(0):  # T is small (4-16): a Python loop is cheap enough
            v = self.beta * v + i_t
            s = spike(v - self.threshold, self.alpha)
            spikes.append(s)
            v = v - s.detach() * self.threshold
        return torch.stack(spikes)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, threshold={self.threshold}, alpha={self.alpha}"


class PerStep(nn.Module):
    """Apply a frame-wise module to every time step at once by folding T into the batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        y = self.module(x.flatten(0, 1))
        return y.unflatten(0, (t, b))


class SpikingEncoder(nn.Module):
    """(B, L) or (B, C, L) analog input -> Conv1d once -> repeated over T steps -> LIF spikes."""

    def __init__(self, conv: nn.Module, time_steps: int, lif: LIF) -> None:
        super().__init__()
        self.conv, self.lif, self.time_steps = conv, lif, int(time_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        current = self.conv(x)
        return self.lif(current.unsqueeze(0).expand(self.time_steps, *current.shape))

    def extra_repr(self) -> str:
        return f"time_steps={self.time_steps}"


class RateReadout(nn.Module):
    """(T, B, ...) spikes -> Flatten + Linear at every step -> mean over T -> logits (B, classes)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(2)).mean(0)


def build_snn(
    *,
    input_shape: Sequence[int] = (40,),
    num_classes: int = 10,
    channels: Sequence[int] = (32, 32, 64, 64),
    time_steps: int = 4,
    beta: float = 0.9,
    threshold: float = 0.5,
    alpha: float = 2.0,
    norm: bool = True,
) -> nn.Sequential:
    """Return the spiking CNN: encoder, `len(channels) - 1` stride-2 spiking blocks, readout.

    `norm` puts a BatchNorm1d after every convolution."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) not in (1, 2):
        raise PlanError(f"snn needs inputs shaped (L,) or (C, L), got {shape}")
    if not channels or time_steps < 1:
        raise PlanError("snn needs at least one conv channel count and one time step")
    in_ch, length = (1, shape[0]) if len(shape) == 1 else shape

    def lif() -> LIF:
        return LIF(beta, threshold, alpha)

    def conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Module:
        layer = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
        return nn.Sequential(layer, nn.BatchNorm1d(c_out)) if norm else layer

    blocks: list[nn.Module] = [SpikingEncoder(conv(in_ch, channels[0], 5, 1), time_steps, lif())]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        blocks.append(nn.Sequential(PerStep(conv(c_in, c_out, 3, 2)), lif()))
        length = (length - 1) // 2 + 1
    blocks.append(RateReadout(nn.Linear(channels[-1] * length, num_classes)))
    return nn.Sequential(*blocks)
