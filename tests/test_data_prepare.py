"""Prepare tests on generated image folders: splits, cache key and hits, bad input, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import make_imagefolder
from PIL import Image

from cnn.data import load_prepared, prepare_dataset
from cnn.data import prepare as prepare_mod
from cnn.data.prepare import stratified_holdout


def _prep(data_dir: Path, cache: Path, **kw):
    return prepare_dataset("imagefolder", data_dir=data_dir, cache_dir=cache, workers=1, **kw)


def test_train_val_layout_val_is_test(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=6, n_val=3)
    info = _prep(tmp_path / "ds", tmp_path / "c")
    assert info.classes == ["ants", "bees"] and info.num_classes == 2 and info.in_channels == 3
    assert info.splits == {"train": 12, "val": 6, "test": 6}
    assert info.test_is_val and "test is the val split" in info.summary()
    assert info.path.parent == tmp_path / "c" and info.path.name.startswith("imagefolder-")
    json.dumps(info.to_dict())  # JSON-friendly
    prep = load_prepared(info.path)
    x, y = prep.split("train")
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == [0] * 6 + [1] * 6
    assert prep.split("test")[0] is prep.split("val")[0]
    # Stored pixels are the decoded PNG pixels (index 1 is a png, formats alternate).
    png = np.array(Image.open(tmp_path / "ds/train/ants/0001.png").convert("RGB"))
    assert torch.equal(x[1].permute(1, 2, 0), torch.from_numpy(png))
    # Mean/std come from the train split on the 0..1 scale.
    xf = x.double() / 255
    assert np.allclose(info.mean, xf.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(info.std, xf.std(dim=(0, 2, 3), correction=0).numpy(), atol=1e-5)


def test_train_only_holds_out_stratified_val(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", classes=("a", "b", "c"), n_train=10, splits=("train",))
    info = _prep(tmp_path / "ds", tmp_path / "c", val_fraction=0.2, seed=3)
    assert info.splits == {"train": 24, "val": 6, "test": 6} and info.test_is_val
    prep = load_prepared(info.path)
    assert torch.bincount(prep.split("val")[1]).tolist() == [2, 2, 2]
    assert torch.bincount(prep.split("train")[1]).tolist() == [8, 8, 8]


def test_train_test_layout_holds_out_val(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=10, n_test=4, splits=("train", "test"))
    info = _prep(tmp_path / "ds", tmp_path / "c")
    assert info.splits == {"train": 18, "val": 2, "test": 8} and not info.test_is_val
    assert "test_is_val" not in info.summary()


def test_parent_of_single_dataset_dir_is_accepted(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "extract" / "cifar10-jpeg", n_train=4, splits=("train",))
    info = _prep(tmp_path / "extract", tmp_path / "c")
    assert info.splits["train"] + info.splits["val"] == 8


def test_holdout_is_seeded_and_disjoint() -> None:
    labels = torch.arange(100) % 4
    tr, va = stratified_holdout(labels, 0.1, seed=0)
    tr2, va2 = stratified_holdout(labels, 0.1, seed=0)
    _, va3 = stratified_holdout(labels, 0.1, seed=1)
    assert torch.equal(va, va2) and not torch.equal(va, va3)
    assert set(tr.tolist()).isdisjoint(va.tolist()) and len(tr) + len(va) == 100
    assert torch.bincount(labels[va]).tolist() == [2, 2, 2, 2]  # round(25 * 0.1) per class


def test_storage_resolution_never_upscales_and_defaults(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "small", n_train=3, n_val=2, size=20)
    assert _prep(tmp_path / "small", tmp_path / "c").resolution == 20  # default 256, no upscale
    make_imagefolder(tmp_path / "big", n_train=3, n_val=2, size=(60, 90))
    info = _prep(tmp_path / "big", tmp_path / "c", resolution=48)
    assert info.resolution == 48
    x, _ = load_prepared(info.path).split("val")
    assert x.shape[-2:] == (48, 48)


def test_cache_hit_decodes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_imagefolder(tmp_path / "ds", n_train=5, n_val=2)
    decoded: list[str] = []
    opened: list[str] = []
    real_decode, real_open = prepare_mod._decode_one, Image.open

    def counting_decode(path, size, *rest):
        decoded.append(path)
        return real_decode(path, size, *rest)

    def counting_open(fp, *a, **kw):
        opened.append(str(fp))
        return real_open(fp, *a, **kw)

    # workers=1 decodes in this process, so the counters see every decode.
    monkeypatch.setattr(prepare_mod, "_decode_one", counting_decode)
    monkeypatch.setattr(Image, "open", counting_open)
    first = _prep(tmp_path / "ds", tmp_path / "c")
    assert not first.cache_hit and first.decoded_images == 14 and len(decoded) == 14
    decoded.clear()
    opened.clear()
    second = _prep(tmp_path / "ds", tmp_path / "c")
    assert second.cache_hit and decoded == [] and opened == [] and second.decoded_images == 0
    assert second.path == first.path and second.splits == first.splits


def test_cache_hit_survives_unreadable_sources_with_same_stat(tmp_path: Path) -> None:
    """A hit must not read images: garbage with the same size and mtime still hits."""
    make_imagefolder(tmp_path / "ds", n_train=4, n_val=2)
    assert not _prep(tmp_path / "ds", tmp_path / "c").cache_hit
    for p in (tmp_path / "ds").rglob("*.*"):
        st = p.stat()
        p.write_bytes(b"\0" * st.st_size)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _prep(tmp_path / "ds", tmp_path / "c").cache_hit


@pytest.mark.parametrize(
    "change", [dict(seed=1), dict(val_fraction=0.2), dict(resolution=16), "touch", "add"]
)
def test_cache_key_covers_params_and_content(tmp_path: Path, change) -> None:
    make_imagefolder(tmp_path / "ds", n_train=5, splits=("train",))
    first = _prep(tmp_path / "ds", tmp_path / "c")
    kw = change if isinstance(change, dict) else {}
    if change == "touch":
        p = tmp_path / "ds/train/ants/0000.jpg"
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    elif change == "add":
        make_imagefolder(tmp_path / "extra", n_train=1, splits=("train",))
        os.replace(tmp_path / "extra/train/ants/0000.jpg", tmp_path / "ds/train/ants/new.jpg")
    second = _prep(tmp_path / "ds", tmp_path / "c", **kw)
    assert not second.cache_hit and second.path != first.path


def test_corrupt_image_reported_by_path_and_skippable(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=4, n_val=2)
    bad = tmp_path / "ds/train/bees/0002.jpg"
    bad.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "ds/val/ants/0000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match="2 unreadable") as err:
        _prep(tmp_path / "ds", tmp_path / "c")
    assert str(bad) in str(err.value) and str(truncated) in str(err.value)
    assert "skip_bad_images" in str(err.value)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    info = _prep(tmp_path / "ds", tmp_path / "c", skip_bad_images=True)
    assert info.skipped_bad_images == 2 and info.splits["train"] == 7
    assert info.splits["val"] == 3 and "skipped 2" in info.summary()


def test_gif_and_grayscale_images_decode_to_rgb(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=3, n_val=2)
    Image.new("P", (40, 30), color=3).save(tmp_path / "ds/train/ants/imageNotFound.gif")
    Image.new("L", (32, 32), color=100).save(tmp_path / "ds/val/bees/gray.png")
    info = _prep(tmp_path / "ds", tmp_path / "c")
    assert info.splits["train"] == 7 and info.in_channels == 3


def test_class_mismatch_between_splits(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=3, n_val=2)
    (tmp_path / "ds/val/bees").rename(tmp_path / "ds/val/wasps")
    with pytest.raises(ValueError, match=r"missing \['bees'\], extra \['wasps'\]"):
        _prep(tmp_path / "ds", tmp_path / "c")


def test_empty_class_is_an_error(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=3, n_val=2)
    (tmp_path / "ds/train/moths").mkdir()
    (tmp_path / "ds/val/moths").mkdir()
    (tmp_path / "ds/val/moths/notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="moths has no images"):
        _prep(tmp_path / "ds", tmp_path / "c")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dataset="cifar11"), "unknown dataset 'cifar11'; valid names: cifar10, cifar100"),
        (dict(val_fraction=1.5), "val_fraction must be between 0 and 1"),
        (dict(resolution=2), "resolution must be an integer >= 8"),
        (dict(seed="x"), "seed must be an integer"),
        (dict(data_dir=None), "data_dir is required"),
    ],
)
def test_bad_prepare_arguments(tmp_path: Path, kw: dict, match: str) -> None:
    args = dict(dataset="imagefolder", data_dir=tmp_path, cache_dir=tmp_path / "c")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        prepare_dataset(args.pop("dataset"), **args)


def test_missing_folder_and_missing_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _prep(tmp_path / "nope", tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        _prep(tmp_path / "empty", tmp_path / "c")


def test_interrupted_write_leaves_no_valid_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_imagefolder(tmp_path / "ds", n_train=4, n_val=2)
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # die while writing the second split
            raise KeyboardInterrupt("simulated kill")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(prepare_mod.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        _prep(tmp_path / "ds", tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []  # temp dir cleaned, nothing final
    monkeypatch.setattr(prepare_mod.torch, "save", real_save)
    # A stale temp dir from a hard kill (no cleanup) never counts as a cache.
    (tmp_path / "c" / ".tmp-imagefolder-junk").mkdir()
    (tmp_path / "c" / ".tmp-imagefolder-junk" / "train.pt").write_bytes(b"partial")
    info = _prep(tmp_path / "ds", tmp_path / "c")
    assert not info.cache_hit and (info.path / "meta.json").exists()


def test_parallel_decode_matches_serial(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=40, n_val=2, size=(24, 40))
    a = prepare_dataset(
        "imagefolder", data_dir=tmp_path / "ds", cache_dir=tmp_path / "a", workers=1
    )
    b = prepare_dataset(
        "imagefolder", data_dir=tmp_path / "ds", cache_dir=tmp_path / "b", workers=2
    )
    xa, ya = load_prepared(a.path).split("train")
    xb, yb = load_prepared(b.path).split("train")
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and a.resolution == b.resolution


def test_default_cache_dir_is_under_data_dir(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=3, n_val=2)
    info = prepare_dataset("imagefolder", data_dir=tmp_path / "ds", cache_dir=None, workers=1)
    assert info.path.parent == tmp_path / "ds" / "cache"
    # The cache folder inside data_dir is not mistaken for a split or class.
    assert prepare_dataset("imagefolder", data_dir=tmp_path / "ds", cache_dir=None).cache_hit


def test_generated_images_are_learnable(tmp_path: Path) -> None:
    """Other suites train on fakedata: a nearest-class-mean classifier must already do well."""
    classes = ("a", "b", "c", "d", "e")
    make_imagefolder(tmp_path / "ds", classes=classes, n_train=8, n_val=6, size=(24, 40))
    prep = load_prepared(_prep(tmp_path / "ds", tmp_path / "c").path)
    (xt, yt), (xv, yv) = prep.split("train"), prep.split("val")
    feats = lambda x: x.float().flatten(1) / 255  # noqa: E731
    centroids = torch.stack([feats(xt[yt == k]).mean(0) for k in range(len(classes))])
    pred = torch.cdist(feats(xv), centroids).argmin(1)
    assert (pred == yv).float().mean() >= 0.9
