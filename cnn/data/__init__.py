"""Data layer: verified sources, a prepared uint8 tensor cache, and batched loaders.

``prepare_dataset`` decodes a source once into ``<cache_dir>/<dataset>-<key>/``;
``build_loaders`` serves it to a training job (in memory on the device, or streaming); image
folders that outgrow memory become a sharded streaming store instead (``shards.py``).

The names below load their module on first use (PEP 562), and torchvision is imported only
where pixels are decoded or transformed: the pipeline's own process unpickles a `PreparedInfo`
and checks a store without importing torchvision, whose import (``torchvision.ops`` pulls in
``torch._dynamo``) costs about 1.6 s before the training job could start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .info import PreparedInfo
    from .loader import Loaders, build_loaders
    from .prepare import Prepared, load_prepared, prepare_dataset
    from .shards import split_arrays
    from .sources import DATASETS, RemoteFile, SourceSpec, get_source

_MODULE_OF = {
    "DATASETS": "sources",
    "Loaders": "loader",
    "Prepared": "prepare",
    "PreparedInfo": "info",
    "RemoteFile": "sources",
    "SourceSpec": "sources",
    "build_loaders": "loader",
    "get_source": "sources",
    "load_prepared": "prepare",
    "prepare_dataset": "prepare",
    "split_arrays": "shards",
}
__all__ = [
    "DATASETS",
    "Loaders",
    "Prepared",
    "PreparedInfo",
    "RemoteFile",
    "SourceSpec",
    "build_loaders",
    "get_source",
    "load_prepared",
    "prepare_dataset",
    "split_arrays",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
