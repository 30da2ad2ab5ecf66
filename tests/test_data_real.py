"""Prepare + load the real sets from ../shared/data (skipped cleanly when it is absent)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from cnn.data import build_loaders, load_prepared, prepare_dataset
from cnn.data.sources import safe_extract

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_ants_bees_prepare_and_finetune_loaders(shared_data: Path, tmp_path: Path) -> None:
    root = safe_extract(shared_data / "hymenoptera_data.tar.gz", tmp_path / "x")
    info = prepare_dataset(
        "imagefolder", data_dir=root / "hymenoptera_data", cache_dir=tmp_path / "c", resolution=64
    )
    # 245 train images including the (valid) imageNotFound.gif; val doubles as test.
    assert info.classes == ["ants", "bees"]
    assert info.splits == {"train": 245, "val": 153, "test": 153} and info.test_is_val
    assert info.resolution == 64
    lo = build_loaders(
        info,
        input_size=56,
        style="finetune",
        batch_size=16,
        normalize=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    )
    lo.train.set_epoch(0)
    x, y = next(iter(lo.train))
    assert x.shape == (16, 3, 56, 56) and torch.isfinite(x).all()
    assert sum(len(y) for _, y in lo.test) == 153


def test_cifar10_jpeg_subset_from_parent_dir(shared_data: Path, tmp_path: Path) -> None:
    per_class = 60
    counts: dict[str, int] = {}
    with tarfile.open(shared_data / "cifar10-jpeg-train.tar.gz") as tar:
        members = []
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 4 and counts.get(parts[2], 0) < per_class:
                counts[parts[2]] = counts.get(parts[2], 0) + 1
                members.append(m)
        tar.extractall(tmp_path / "x", members=members, filter="data")
    # data_dir is the parent of cifar10-jpeg/, which holds train/.
    info = prepare_dataset("imagefolder", data_dir=tmp_path / "x", cache_dir=tmp_path / "c")
    assert info.num_classes == 10 and info.resolution == 32 and info.test_is_val
    assert info.splits["train"] + info.splits["val"] == 10 * per_class
    assert info.splits["val"] == 10 * round(per_class * 0.1)
    x, _ = load_prepared(info.path).split("train")
    # 32x32 JPEGs stay 32x32 uint8: about 3 KB per image, not a float or upscaled copy.
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
    cache_bytes = sum(p.stat().st_size for p in info.path.iterdir())
    assert cache_bytes < 3200 * 10 * per_class
