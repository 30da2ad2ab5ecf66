"""DenseNet for 32x32 images from the chapter's dense layer and transition block (Huang et al.)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import register_model

__all__ = [
    "DenseLayer",
    "DenseNetCifar",
    "Transition",
    "densenet121_cifar",
    "densenet169_cifar",
    "densenet201_cifar",
    "densenet_bc_100_k12_cifar",
    "densenet_cifar",
]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k; the k new maps join the input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        inner = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, inner, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth_rate, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv that compresses the channels, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNetCifar(nn.Module):
    """3x3 stem to 2k maps, dense blocks joined by transitions (compression 0.5), global pool."""

    def __init__(
        self,
        block_config: tuple[int, ...],
        growth_rate: int,
        num_classes: int = 10,
        in_channels: int = 3,
        compression: float = 0.5,
    ) -> None:
        super().__init__()
        channels = 2 * growth_rate
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)
        ]
        for i, num_layers in enumerate(block_config):
            for _ in range(num_layers):
                layers.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            if i < len(block_config) - 1:
                out = int(channels * compression)
                layers.append(Transition(channels, out))
                channels = out
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("densenet121_cifar", family="densenet", min_input_size=8)
def densenet121_cifar(
    *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> DenseNetCifar:
    """DenseNet-121's block plan (6, 12, 24, 16), growth rate 32, for 32x32 images."""
    return DenseNetCifar((6, 12, 24, 16), 32, num_classes, in_channels, **kwargs)


@register_model("densenet169_cifar", family="densenet", min_input_size=8)
def densenet169_cifar(
    *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> DenseNetCifar:
    """DenseNet-169's block plan (6, 12, 32, 32), growth rate 32, for 32x32 images."""
    return DenseNetCifar((6, 12, 32, 32), 32, num_classes, in_channels, **kwargs)


@register_model("densenet201_cifar", family="densenet", min_input_size=8)
def densenet201_cifar(
    *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> DenseNetCifar:
    """DenseNet-201's block plan (6, 12, 48, 32), growth rate 32, for 32x32 images."""
    return DenseNetCifar((6, 12, 48, 32), 32, num_classes, in_channels, **kwargs)


@register_model("densenet_bc_100_k12_cifar", family="densenet", min_input_size=4)
def densenet_bc_100_k12_cifar(
    *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> DenseNetCifar:
    """DenseNet-BC with depth 100 and growth rate 12: three blocks of 16 layers (0.8M params)."""
    return DenseNetCifar((16, 16, 16), 12, num_classes, in_channels, **kwargs)


@register_model("densenet_cifar", family="densenet", min_input_size=4)
def densenet_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> DenseNetCifar:
    """The chapter's DenseNet for CIFAR under its short name: the small growth-12 variant
    (DenseNet-BC-100, k=12), cheap enough to compare against LeNet and ResNet-18 on a CPU."""
    return densenet_bc_100_k12_cifar(num_classes=num_classes, in_channels=in_channels, **kwargs)
