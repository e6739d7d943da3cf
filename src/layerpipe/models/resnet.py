"""ResNet-18 in its CIFAR form (He et al. 2016, as in kuangliu/pytorch-cifar): 3x3 stem with
stride 1 and no max-pool, four stages of two BasicBlocks (64, 128, 256, 512 channels),
global average pool and a linear head. 11.17 M parameters for 10 classes, 11.22 M for 100.

    model = build_resnet18(num_classes=100)   # input (B, 3, 32, 32), logits (B, 100)

Blocks (10): stem (conv+BN+ReLU), the 8 BasicBlocks, head (pool + flatten + fc). The
BatchNorm running statistics are buffers that the forward pass updates.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from layerpipe.errors import PlanError


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 conv+BN projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def build_resnet18(
    *,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int = 100,
    width: int = 64,
) -> nn.Sequential:
    """Return CIFAR ResNet-18 as `nn.Sequential(stem, 8 BasicBlocks, head)`."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        raise PlanError(f"resnet18 needs inputs shaped (C, H, W), got {shape}")
    widths = [width, 2 * width, 4 * width, 8 * width]
    blocks: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(shape[0], width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
    ]
    c_in = width
    for i, c_out in enumerate(widths):
        stride = 1 if i == 0 else 2
        blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)))
    return nn.Sequential(*blocks)
