"""GoogLeNet for 32x32 images, built from the chapter's four-branch ``InceptionModule``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import register_model

__all__ = ["ConvBNReLU", "GoogLeNetCifar", "InceptionModule", "googlenet_cifar"]


class ConvBNReLU(nn.Sequential):
    """Convolution, batch norm, ReLU: the unit every Inception branch is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class InceptionModule(nn.Module):
    """Four parallel branches, concatenated along channels.

    1x1; 1x1 then 3x3; 1x1 then two 3x3 (a factorized 5x5); 3x3 max-pool then 1x1.
    """

    def __init__(
        self,
        in_channels: int,
        n1x1: int,
        n3x3_reduce: int,
        n3x3: int,
        n5x5_reduce: int,
        n5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.branch1 = ConvBNReLU(in_channels, n1x1, 1)
        self.branch2 = nn.Sequential(
            ConvBNReLU(in_channels, n3x3_reduce, 1), ConvBNReLU(n3x3_reduce, n3x3, 3)
        )
        self.branch3 = nn.Sequential(
            ConvBNReLU(in_channels, n5x5_reduce, 1),
            ConvBNReLU(n5x5_reduce, n5x5, 3),
            ConvBNReLU(n5x5, n5x5, 3),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), ConvBNReLU(in_channels, pool_proj, 1)
        )
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([b(x) for b in branches], dim=1)


class GoogLeNetCifar(nn.Module):
    """GoogLeNet with the chapter's channel plan im1..im9, a 3x3 stem and no early downsampling."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = ConvBNReLU(in_channels, 192, 3)
        self.im1 = InceptionModule(192, 64, 96, 128, 16, 32, 32)
        self.im2 = InceptionModule(256, 128, 128, 192, 32, 96, 64)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)  # 32 -> 16
        self.im3 = InceptionModule(480, 192, 96, 208, 16, 48, 64)
        self.im4 = InceptionModule(512, 160, 112, 224, 24, 64, 64)
        self.im5 = InceptionModule(512, 128, 128, 256, 24, 64, 64)
        self.im6 = InceptionModule(512, 112, 144, 288, 32, 64, 64)
        self.im7 = InceptionModule(528, 256, 160, 320, 32, 128, 128)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)  # 16 -> 8
        self.im8 = InceptionModule(832, 256, 160, 320, 32, 128, 128)
        self.im9 = InceptionModule(832, 384, 192, 384, 48, 128, 128)
        # The chapter's forward fed a 4096-wide classifier; GoogLeNet uses global average pooling.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.im2(self.im1(self.stem(x)))
        x = self.pool1(x)
        x = self.im7(self.im6(self.im5(self.im4(self.im3(x)))))
        x = self.pool2(x)
        x = self.im9(self.im8(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


@register_model("googlenet_cifar", family="googlenet", min_input_size=1)
def googlenet_cifar(
    *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> GoogLeNetCifar:
    """GoogLeNet for 32x32 images (no auxiliary heads)."""
    return GoogLeNetCifar(num_classes=num_classes, in_channels=in_channels, **kwargs)
