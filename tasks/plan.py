"""Turn pipeline arguments into a validated TrainConfig and LaunchSpec, before anything starts.

No prefect or mlflow here: the CLI calls this first, so bad input (unknown model or dataset, a
missing data dir, a bad `key=value`) fails within a second, before Prefect's API starts and
before anything is written to MLflow. The flows call it again (deployments skip the CLI).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cnn.config import TrainConfig, parse_overrides, resolve_config
from tasks.launch import LaunchSpec

Overrides = Iterable[str] | dict[str, Any] | None


def check_dataset(dataset: str, data_dir: str | Path, download: bool = True) -> None:
    """Unknown dataset names and missing image folders are errors that name the fix."""
    from cnn.data import get_source
    from cnn.data.sources import find_folder_root

    if dataset.lower() == "imagefolder":
        find_folder_root(data_dir)  # raises FileNotFoundError naming the folder
        return
    get_source(dataset)  # raises ValueError listing the valid names
    if not download and not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"data dir {data_dir} does not exist and download is off; point --data-dir at the "
            f"folder holding {dataset}, or allow the download"
        )


def plan_training(
    *,
    model: str,
    dataset: str,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    recipe: str | None = None,
    config_file: str | None = None,
    overrides: Overrides = None,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
) -> tuple[TrainConfig, LaunchSpec]:
    """Resolve and validate the run's config and its torchrun launch (raises ValueError /
    FileNotFoundError naming the bad value)."""
    launch = LaunchSpec(
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        max_restarts=max_restarts,
    )
    launch.validate()
    extra: dict[str, Any] = {
        "nproc_per_node": nproc_per_node,
        "nnodes": nnodes,
        "rdzv_endpoint": rdzv_endpoint,
        "max_restarts": max_restarts,
    }
    if data_dir is not None:
        extra["data_dir"] = data_dir
    if cache_dir is not None:
        extra["cache_dir"] = cache_dir
    cfg = resolve_config(
        model=model,
        dataset=dataset,
        recipe=recipe,
        config_file=config_file,
        overrides={**extra, **parse_overrides(overrides)},
        validate=False,
    )
    cfg.validate(nproc_per_node=nproc_per_node, nnodes=nnodes)
    check_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    return cfg, launch
