"""Every architecture, by name: ``get_model("resnet18_cifar", num_classes=10)``.

Importing this package registers our from-scratch CIFAR models; torchvision's classification zoo
registers itself on first need (a zoo name, ``list_models``), so a job that builds one of ours
never imports torchvision's models. See ``_api.py`` for the registry and docs/internals.md.
"""

from . import alexnet, densenet, googlenet, lenet, resnet, resnet9, vgg  # noqa: F401  (registers)
from ._api import *  # noqa: F403  (the registry's public names, listed once: _api.__all__)
from ._api import __all__  # noqa: F401
