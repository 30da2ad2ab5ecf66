"""The one owner of the data decisions: input size, eval resize, normalisation, augmentation.

In the spirit of timm's ``resolve_data_config``: decided once from the model, the config and the
prepared data; the result is stored in every checkpoint (``meta["data_config"]``, plus the flat
``input_size``/``resize_size``/``mean``/``std`` keys the exporter reads), and the loaders,
evaluation and the exported model all take it from there, so training, evaluation and serving
cannot disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .augment import STYLES

# Eval resize of the shorter side relative to the crop for styles that crop from a larger
# image (torchvision's presets: 256 for 224).
DEFAULT_CROP_RATIO = 224 / 256


@dataclass(frozen=True)
class DataConfig:
    """What both loaders, evaluation and the exported model need to agree on."""

    input_size: int  # the square the network sees
    resize_size: int  # eval: shorter side resized to this, then center-cropped to input_size
    mean: tuple[float, ...]  # normalisation on the 0..1 scale
    std: tuple[float, ...]
    style: str  # training augmentation: cifar | flip | finetune | none

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def eval_resize_size(style: str, input_size: int, crop_ratio: float = DEFAULT_CROP_RATIO) -> int:
    """The eval resize rule: none for CIFAR-style training (the stored image is the crop), the
    model's own crop ratio for fine-tuning-style training on larger photos."""
    if style in ("cifar", "flip", "none"):
        return input_size
    return round(input_size / crop_ratio)


def resolve_data_config(
    *,
    model_input_size: int,
    model_resize_size: int,
    model_mean: Sequence[float],
    model_std: Sequence[float],
    model_source: str,
    data_mean: Sequence[float],
    data_std: Sequence[float],
    input_size: int | None = None,
    aug: str = "auto",
    pretrained: bool = False,
) -> DataConfig:
    """Decide the data config of a run.

    - input size: the config's, else the model's default;
    - style: the config's ``aug``, else ``finetune`` for torchvision models (photos, random
      resized crops) and ``cifar`` for our 32-px models;
    - eval resize: ``eval_resize_size`` with the model's own crop ratio;
    - normalisation: the pretrained weights' mean/std when fine-tuning (what they expect),
      else the training split's own statistics.
    """
    size = int(input_size or model_input_size)
    style = aug if aug != "auto" else ("finetune" if model_source == "torchvision" else "cifar")
    if style not in STYLES:
        raise ValueError(f"aug must be one of auto, {', '.join(STYLES)}, got {aug!r}")
    ratio = model_input_size / model_resize_size if model_resize_size else DEFAULT_CROP_RATIO
    mean, std = (model_mean, model_std) if pretrained else (data_mean, data_std)
    return DataConfig(
        input_size=size,
        resize_size=eval_resize_size(style, size, ratio),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        style=style,
    )
