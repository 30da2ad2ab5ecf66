"""The chapter's small AlexNet for 32x32 images: five convolutions, then one Linear(256, N)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import register_model

__all__ = ["AlexNetCifar", "alexnet_cifar"]


class AlexNetCifar(nn.Module):
    """AlexNet's five convolutions (64, 192, 384, 256, 256 maps) scaled down for CIFAR."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=5),  # 32 -> 8
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> 4
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> 2
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2, stride=2),  # -> 1
        )
        # At 32x32 the map is already 1x1; pooling keeps larger inputs working too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("alexnet_cifar", family="alexnet", min_input_size=29)
def alexnet_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> AlexNetCifar:
    """The chapter's small AlexNet for 32x32 images."""
    return AlexNetCifar(num_classes=num_classes, in_channels=in_channels, **kwargs)
