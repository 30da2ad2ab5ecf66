"""torchvision's classification zoo, registered under torchvision's own names.

Every builder comes from torchvision (``torchvision.models.get_model``); this module only adds
what the registry needs around it: input geometry and normalization taken from each model's
weights transforms, the measured minimum input size, and offline-friendly pretrained loading.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from ._api import register_model, replace_first_conv

__all__ = ["ZOO_MODELS", "weights_cache_path"]

ZOO_MODELS: tuple[str, ...] = tuple(tvm.list_models(module=tvm))

# Family of each torchvision name, by prefix (first match wins, so longer prefixes come first).
_FAMILIES = (
    ("efficientnet_v2", "efficientnet_v2"),
    ("efficientnet", "efficientnet"),
    ("mobilenet", "mobilenet"),
    ("wide_resnet", "wide_resnet"),
    ("resnext", "resnext"),
    ("resnet", "resnet"),
    ("inception", "inception"),
    ("shufflenet", "shufflenet"),
    ("squeezenet", "squeezenet"),
    ("swin", "swin"),
    ("vit", "vit"),
)

# Smallest square input a train-mode forward accepts, measured by a binary search over sizes
# on the meta device (tests/test_models.py re-checks each at its minimum). Unlisted models take
# any size >= 1. Inception v3 needs 299 in train mode: its auxiliary head needs a 17x17 map.
_MIN_INPUT_SIZE = {
    "alexnet": 63,
    "googlenet": 15,
    "inception_v3": 299,
    "squeezenet1_0": 21,
    "squeezenet1_1": 17,
    **{f"convnext_{s}": 32 for s in ("tiny", "small", "base", "large")},
    **{f"densenet{d}": 29 for d in (121, 161, 169, 201)},
    **{f"swin_{v}{s}": 4 for v in ("", "v2_") for s in "tsb"},
    **{f"vgg{d}{bn}": 32 for d in (11, 13, 16, 19) for bn in ("", "_bn")},
}

# ViT's position embeddings fix the image size at build time; the builder's `image_size` sets it
# (a multiple of the patch size). MaxViT's window partitions need multiples of 224.
_VIT_PATCH = {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16, "vit_l_32": 32, "vit_h_14": 14}

# torchvision's GoogLeNet/Inception builders warn unless init_weights is given; True is their
# default for random initialization, and False is what they use under pretrained weights.
_NEEDS_INIT_WEIGHTS = ("googlenet", "inception_v3")


def _family(name: str) -> str:
    for prefix, family in _FAMILIES:
        if name.startswith(prefix):
            return family
    return re.match(r"[a-z]+", name).group()  # type: ignore[union-attr]  # vgg, regnet, ...


def weights_cache_path(weights: WeightsEnum) -> Path:
    """Where torch hub looks for (and downloads) ``weights``: $TORCH_HOME/hub/checkpoints/<file>."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _builder(name: str, default_kw: dict[str, Any]) -> Any:
    def build(*, num_classes: int = 1000, in_channels: int = 3, **kw: Any) -> nn.Module:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **{**default_kw, **kw})
        return replace_first_conv(model, name, in_channels)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchvision's {name} (random initialization)."
    return build


def _weights_loader(name: str) -> Any:
    def load(weights_name: str, **kw: Any) -> nn.Module:
        weights = tvm.get_model_weights(name)[weights_name]
        cache = weights_cache_path(weights)
        try:
            return tvm.get_model(name, weights=weights, progress=False, **kw)
        except OSError as exc:  # URLError (offline) and friends
            raise FileNotFoundError(
                f"cannot download the {weights_name} weights of {name!r} from {weights.url} "
                f"({exc}). With no network, copy that file to {cache} (torch hub's cache: "
                "$TORCH_HOME/hub/checkpoints/), or pass the path of a local state-dict file as "
                "pretrained=PATH"
            ) from exc

    return load


def _drop_googlenet_aux(model: nn.Module, kw: dict[str, Any]) -> None:
    """As torchvision does for its own weights: its aux heads were never trained on ImageNet."""
    if not kw.get("aux_logits", False):
        model.aux_logits = False
        model.aux1 = None
        model.aux2 = None


def _register(name: str) -> None:
    weights_enum = tvm.get_model_weights(name)
    default = weights_enum.DEFAULT
    transforms = default.transforms()
    input_size = int(transforms.crop_size[0])
    default_kw: dict[str, Any] = {}
    if name in _NEEDS_INIT_WEIGHTS:
        default_kw["init_weights"] = True
    options: dict[str, Any] = {"min_input_size": _MIN_INPUT_SIZE.get(name, 1)}
    if name in _VIT_PATCH:
        default_kw["image_size"] = input_size  # vit_h_14's only full weights are at 518
        patch = _VIT_PATCH[name]
        options = {
            "min_input_size": patch,
            "input_size_multiple": patch,
            "fixed_input_size": True,
            "size_kw": "image_size",
        }
    elif name == "maxvit_t":
        options = {
            "min_input_size": 224,
            "input_size_multiple": 224,
            "fixed_input_size": True,
            "size_kw": "input_size",
            "size_kw_as_pair": True,
        }
    pretrained_kwargs: dict[str, Any] = {}
    after_load = None
    if name in _NEEDS_INIT_WEIGHTS:  # what their builders set for their own weights
        pretrained_kwargs = {"transform_input": True, "init_weights": False}
    if name == "googlenet":
        pretrained_kwargs["aux_logits"] = True
        after_load = _drop_googlenet_aux

    register_model(
        name,
        family=_family(name),
        input_size=input_size,
        resize_size=int(transforms.resize_size[0]),
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        source="torchvision",
        params_num_classes=1000,
        # As published in the weights' metadata (GoogLeNet: without its untrained aux heads);
        # tests check it against built models. Saves ~80 meta builds when listing models.
        params=int(default.meta["num_params"]),
        weights=tuple(w.name for w in weights_enum),
        load_weights=_weights_loader(name),
        weights_input_size=lambda w: int(weights_enum[w].transforms().crop_size[0]),
        pretrained_kwargs=pretrained_kwargs,
        after_load=after_load,
        **options,
    )(_builder(name, default_kw))


for _name in ZOO_MODELS:
    _register(_name)
