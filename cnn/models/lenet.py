"""LeNet-5 as in the chapter: 5x5 convolutions (6, 16 maps), 2x2 max pooling, FC 400-120-84-N."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._api import register_model

__all__ = ["LeNet5", "chapter_order", "lenet5"]


class LeNet5(nn.Module):
    """LeNet-5 for 32x32 images (MNIST padded to 32, CIFAR)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        # ReLU after the pooling: max and ReLU commute (the same function and gradients as the
        # chapter's conv-ReLU-pool), and the ReLU then touches 4x fewer values. On a CPU the
        # elementwise passes over the 6-channel maps cost as much as a convolution; measured
        # LeNet steps ~5% faster (batch 256, 1 thread, channels_last). No parameter moves.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),  # 32 -> 28
            nn.MaxPool2d(2),  # -> 14
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 16, kernel_size=5),  # -> 10
            nn.MaxPool2d(2),  # -> 5
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# The 400-wide first FC layer fixes the input at 32x32, as in the chapter.
@register_model("lenet5", family="lenet", min_input_size=32, fixed_input_size=True)
def lenet5(*, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> LeNet5:
    """LeNet-5: 62,006 parameters at 3 channels and 10 classes."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, **kwargs)


def chapter_order(model: LeNet5) -> LeNet5:
    """`model` with the chapter's conv-ReLU-pool layer order (in place; same parameters and
    state_dict keys). The reference the pool-first order is measured and tested against."""
    conv1, pool1, relu1, conv2, pool2, relu2 = model.features
    model.features = nn.Sequential(conv1, relu1, pool1, conv2, relu2, pool2)
    return model
