"""Prefect task: download and prepare a dataset into the tensor cache or the shard store."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, CacheKeyFnPolicy

from cnn.data.images import MAX_IMAGE_PIXELS
from cnn.data.info import FORMAT_VERSION, PreparedInfo
from cnn.data.shards import store_exists
from tasks.common import retry_on_io_error

# Bump when what the task returns changes shape or module, so that Prefect's stored results of
# older code miss (prepare then finds its tensor cache and answers within a second). 2: the
# result is `cnn.data.info.PreparedInfo` (unpickling the old one imported torchvision).
_RESULT_VERSION = 2


def _source_fingerprint(context: Any, parameters: dict[str, Any]) -> str:
    """Part of the cache key: the cache format and result versions, and for image folders the
    mtimes of the split and class folders. Adding, removing or renaming images changes their
    folder's mtime, so Prefect's cache misses and prepare's own content hash decides.
    (Downloaded datasets are fixed by their checksums.)"""
    return f"format{FORMAT_VERSION}.result{_RESULT_VERSION}:{_folder_mtimes(parameters)}"


def _folder_mtimes(parameters: dict[str, Any]) -> str:
    if str(parameters.get("dataset", "")).lower() != "imagefolder":
        return "fixed-source"
    from cnn.folders import find_folder_root

    try:
        root = find_folder_root(parameters.get("data_dir") or "data")
    except FileNotFoundError:
        return "missing"
    dirs = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    dirs += [c for s in list(dirs) for c in sorted(s.iterdir()) if c.is_dir()]
    return ";".join(f"{d.relative_to(root)}:{d.stat().st_mtime_ns}" for d in dirs)


@task(
    name="prepare-dataset",
    cache_policy=INPUTS + CacheKeyFnPolicy(cache_key_fn=_source_fingerprint),
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on_io_error,
)
def prepare_dataset(
    dataset: str,
    data_dir: str,
    cache_dir: str | None = None,
    resolution: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
    download: bool = True,
    mirror: str | None = None,
    storage: str = "auto",
    image_cap: int | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> PreparedInfo:
    """Decode once into <cache_dir>/<dataset>-<key>/ (tensor cache or shard store); cached by
    its inputs, retried on I/O."""
    from cnn.data.prepare import prepare_dataset as prepare  # the decoding side: on a cache miss

    return prepare(
        dataset,
        data_dir=data_dir,
        cache_dir=cache_dir,
        resolution=resolution,
        val_fraction=val_fraction,
        seed=seed,
        skip_bad_images=skip_bad_images,
        download=download,
        mirror=mirror,
        storage=storage,
        image_cap=image_cap,
        max_image_pixels=max_image_pixels,
    )


def prepare_for(cfg: Any) -> tuple[PreparedInfo, bool]:
    """Run the task with a TrainConfig's data fields (the same ones the training job uses, so
    the job gets a cache hit) -> (info, prefect_cache_hit). A Prefect-cached result whose tensor
    cache was deleted meanwhile is recomputed."""
    kwargs = {"dataset": cfg.data.dataset, **cfg.data_kwargs()}
    state = prepare_dataset(**kwargs, return_state=True)
    info = state.result()
    cached = state.name == "Cached"
    if not store_exists(info.path):
        info = prepare_dataset.with_options(refresh_cache=True)(**kwargs)
        cached = False
    return info, cached
