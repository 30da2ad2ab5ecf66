"""Data layer: verified sources, a prepared uint8 tensor cache, and batched loaders.

``prepare_dataset`` decodes a source once into ``<cache_dir>/<dataset>-<key>/``;
``build_loaders`` serves it to a training job (in memory on the device, or streaming); image
folders that outgrow memory become a sharded streaming store instead (``shards.py``).
"""

from .loader import Loaders, build_loaders
from .prepare import Prepared, PreparedInfo, load_prepared, prepare_dataset
from .shards import split_arrays
from .sources import DATASETS, RemoteFile, SourceSpec, get_source

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
