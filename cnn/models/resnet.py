"""ResNet 18/34/50/101/152 for 32x32 images: 3x3 stem, no stem max-pool (He et al. 2016)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNetCifar",
    "resnet18_cifar",
    "resnet34_cifar",
    "resnet50_cifar",
    "resnet101_cifar",
    "resnet152_cifar",
]


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 projection (option B of the paper) when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Four stages of 64/128/256/512 planes at strides 1/2/2/2, global pooling, one Linear."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18_cifar", family="resnet", min_input_size=1)
def resnet18_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ResNetCifar:
    """ResNet-18 (BasicBlock, 2-2-2-2) for 32x32 images."""
    return ResNetCifar(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, **kwargs)


@register_model("resnet34_cifar", family="resnet", min_input_size=1)
def resnet34_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ResNetCifar:
    """ResNet-34 (BasicBlock, 3-4-6-3) for 32x32 images."""
    return ResNetCifar(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, **kwargs)


@register_model("resnet50_cifar", family="resnet", min_input_size=1)
def resnet50_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ResNetCifar:
    """ResNet-50 (Bottleneck, 3-4-6-3) for 32x32 images."""
    return ResNetCifar(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, **kwargs)


@register_model("resnet101_cifar", family="resnet", min_input_size=1)
def resnet101_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ResNetCifar:
    """ResNet-101 (Bottleneck, 3-4-23-3) for 32x32 images."""
    return ResNetCifar(Bottleneck, [3, 4, 23, 3], num_classes, in_channels, **kwargs)


@register_model("resnet152_cifar", family="resnet", min_input_size=1)
def resnet152_cifar(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ResNetCifar:
    """ResNet-152 (Bottleneck, 3-8-36-3) for 32x32 images."""
    return ResNetCifar(Bottleneck, [3, 8, 36, 3], num_classes, in_channels, **kwargs)
