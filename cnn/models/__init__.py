"""Every architecture, by name: ``get_model("resnet18_cifar", num_classes=10)``.

Importing this package registers our from-scratch CIFAR models and torchvision's classification
zoo. See ``_api.py`` for the registry and docs/internals.md for the contract.
"""

from . import alexnet, densenet, googlenet, lenet, resnet, resnet9, vgg, zoo  # noqa: F401  (registers)
from ._api import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInfo,
    check_input_size,
    format_models_table,
    get_model,
    list_models,
    main_logits,
    model_info,
    register_model,
    training_loss,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelInfo",
    "check_input_size",
    "format_models_table",
    "get_model",
    "list_models",
    "main_logits",
    "model_info",
    "register_model",
    "training_loss",
]
