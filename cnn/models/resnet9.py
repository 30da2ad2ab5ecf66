"""ResNet-9 for 32x32 images: the fast-CIFAR net (Myrtle.ai / DAWNBench, ancestor of airbench).

Why a separate small net: the fastest known way to 94% on CIFAR-10 is a shallow, wide net whose
whole dataset lives on the GPU with batch augmentation, not a deeper ResNet. Layout (David Page,
"How to train your ResNet"): prep conv 64; conv 128 + pool + residual(128); conv 256 + pool;
conv 512 + pool + residual(512); global max-pool; a bias-free Linear whose logits are scaled by
1/8 (keeps the softmax soft early, so a high learning rate is stable).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import register_model

__all__ = ["ResNet9", "resnet9_cifar"]


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv (no bias: batch norm follows), batch norm, ReLU, optional 2x2 max-pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """Prep, three pooled stages (two with a residual pair), max-pool, scaled linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, scale: float = 0.125) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, 64),
            _conv_bn(64, 128, pool=True),
            _Residual(128),
            _conv_bn(128, 256, pool=True),
            _conv_bn(256, 512, pool=True),
            _Residual(512),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(512, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)) * self.scale


# Three 2x2 pools: 8 px is the smallest input that still has one pixel left.
@register_model("resnet9_cifar", family="resnet", min_input_size=8)
def resnet9_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ResNet9:
    """ResNet-9 (fast-CIFAR): about 6.6 M parameters at 10 classes."""
    return ResNet9(num_classes=num_classes, in_channels=in_channels, **kwargs)
