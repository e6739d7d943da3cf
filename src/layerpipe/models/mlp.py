"""Multi-layer perceptron: flatten, then Linear+ReLU blocks and a Linear head.

    model = build_mlp(input_shape=(40,), num_classes=10)   # MNIST-1D
    model = build_mlp(input_shape=(64,), num_classes=10)   # sklearn digits

Blocks: `hidden` Linear+ReLU blocks (the first one flattens its input) and one Linear head,
so a model with 4 hidden layers splits into at most 5 stages.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


def build_mlp(
    *,
    input_shape: Sequence[int] = (40,),
    num_classes: int = 10,
    hidden: Sequence[int] = (256, 256, 256, 256),
) -> nn.Sequential:
    """Return `nn.Sequential(block_0, ..., head)`; each block is `[Flatten,] Linear, ReLU`."""
    width = math.prod(int(d) for d in input_shape)
    blocks: list[nn.Module] = []
    for i, h in enumerate(hidden):
        layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        blocks.append(nn.Sequential(*layers))
        width = int(h)
    head: list[nn.Module] = [] if hidden else [nn.Flatten()]
    blocks.append(nn.Sequential(*head, nn.Linear(width, num_classes)))
    return nn.Sequential(*blocks)
