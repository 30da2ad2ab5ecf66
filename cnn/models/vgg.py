"""VGG 11/13/16/19, with and without batch norm, for 32x32 images, built from a config table."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import register_model

__all__ = ["VGG_CONFIGS", "VGGCifar", "make_layers"]

# Output channels per 3x3 convolution; "M" is a 2x2 max-pool (Simonyan & Zisserman, table 1).
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
    + [512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"]
    + [512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_layers(config: list[int | str], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """The convolutional trunk described by one row of ``VGG_CONFIGS``."""
    layers: list[nn.Module] = []
    channels = in_channels
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        channels = v
    return nn.Sequential(*layers)


class VGGCifar(nn.Module):
    """VGG trunk (five 2x2 pools take 32x32 to 1x1) and one Linear(512, N) classifier."""

    def __init__(
        self,
        config: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.features = make_layers(config, in_channels, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _register(depth: str, batch_norm: bool) -> None:
    name = f"{depth}{'_bn' if batch_norm else ''}_cifar"

    @register_model(name, family="vgg", min_input_size=32)
    def builder(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> VGGCifar:
        return VGGCifar(VGG_CONFIGS[depth], num_classes, in_channels, batch_norm, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{depth.upper()}{' with batch norm' if batch_norm else ''} for 32x32 images."
    globals()[name] = builder
    __all__.append(name)


for _depth in VGG_CONFIGS:
    for _bn in (False, True):
        _register(_depth, _bn)
