"""1-D convolutional network for MNIST-1D (the project's main pipelining workload).

    model = build_cnn1d()                  # input (B, 40) or (B, 1, 40), logits (B, 10)
    logits = model(torch.randn(8, 40))

Blocks (5 by default, so the model splits into up to 5 stages):

    0  stem   (B, 40) -> (B, 1, 40) -> Conv1d(1, 32, k=5) + BN + ReLU     length 40
    1  conv   Conv1d(32, 32, k=3, stride 2) + BN + ReLU                    length 20
    2  conv   Conv1d(32, 64, k=3, stride 2) + BN + ReLU                    length 10
    3  conv   Conv1d(64, 64, k=3, stride 2) + BN + ReLU                    length 5
    4  head   Flatten + Linear(64 * 5, 10)

The three strided blocks cost about the same (~61 k multiply-adds per sample each), stem
and head are cheap. BatchNorm (`norm=True`, the default) matters for pipelining: it makes
each block's output invariant to the scale of its weights, so a stale gradient moves the
function less. With the recipe of `layerpipe.training.RECIPES` (Adam lr 2e-3, batch 64,
30 epochs; 3 seeds, docs/results.md) sync training reaches 97.4% with BatchNorm and 90.0%
without, exact stashing at 4 stages 97.4% with it and 83.1% without. The engine runs each
forward once per microbatch (no recomputation), so the running statistics are updated
once per microbatch, as in plain training.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerpipe.errors import PlanError


class ToChannels(nn.Module):
    """Give a (B, L) batch one channel, (B, 1, L); a (B, C, L) batch passes unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1) if x.dim() == 2 else x


def conv_out_len(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def build_cnn1d(
    *,
    input_shape: Sequence[int] = (40,),
    num_classes: int = 10,
    channels: Sequence[int] = (32, 32, 64, 64),
    stem_kernel: int = 5,
    norm: bool = True,
) -> nn.Sequential:
    """Return the CNN: a stride-1 stem, `len(channels) - 1` stride-2 blocks, a linear head.

    `input_shape` is one sample's shape: (L,) for one channel or (C, L). `norm` puts a
    BatchNorm1d after every convolution.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) not in (1, 2):
        raise PlanError(f"cnn1d needs inputs shaped (L,) or (C, L), got {shape}")
    if not channels:
        raise PlanError("cnn1d needs at least one conv channel count")
    in_ch, length = (1, shape[0]) if len(shape) == 1 else shape
    pad = stem_kernel // 2

    def conv_block(conv: nn.Conv1d) -> list[nn.Module]:
        return [conv, nn.BatchNorm1d(conv.out_channels), nn.ReLU()] if norm else [conv, nn.ReLU()]

    blocks: list[nn.Module] = [
        nn.Sequential(ToChannels(), *conv_block(nn.Conv1d(in_ch, channels[0], stem_kernel, padding=pad)))
    ]
    length = conv_out_len(length, stem_kernel, 1, pad)
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        blocks.append(nn.Sequential(*conv_block(nn.Conv1d(c_in, c_out, 3, stride=2, padding=1))))
        length = conv_out_len(length, 3, 2, 1)
    if length < 1:
        raise PlanError(f"input length {shape[-1]} is too short for {len(channels) - 1} stride-2 blocks")
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * length, num_classes)))
    return nn.Sequential(*blocks)
