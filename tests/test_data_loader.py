"""Loader tests: sharding, exact eval, resumable seeded augmentation, memory vs stream paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakedata import make_imagefolder

from cnn.data import Prepared, PreparedInfo, build_loaders, prepare_dataset
from cnn.data.augment import BatchAugment, random_crop_flip, random_resized_crop_flip


def _prepared(n: int, size: int = 8, channels: int = 3) -> Prepared:
    """A Prepared whose labels are the sample indices, so batches reveal which samples they hold."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n)
    info = PreparedInfo(
        path=Path("/nonexistent"),
        dataset="synthetic",
        classes=[str(i) for i in range(n)],
        num_classes=n,
        in_channels=channels,
        resolution=size,
        splits={"train": n, "val": n, "test": n},
        test_is_val=True,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        source_hash="x",
        cache_hit=True,
        seconds=0.0,
    )
    return Prepared(
        info, {"train": (images, labels), "val": (images, labels), "test": (images, labels)}
    )


def _epoch_labels(loader, start: int = 0) -> list[list[int]]:
    return [y.tolist() for _, y in loader.iterate(start)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_shards_disjoint_and_cover_global_batches(world: int) -> None:
    n, gb = 50, 12
    prep = _prepared(n)
    single = build_loaders(prep, input_size=8, style="cifar", batch_size=gb, mode="memory")
    single.train.set_epoch(3)
    reference = _epoch_labels(single.train)
    assert len(reference) == n // gb
    per_rank = []
    for r in range(world):
        lo = build_loaders(
            prep,
            input_size=8,
            style="cifar",
            batch_size=gb,
            rank=r,
            world_size=world,
            mode="memory",
        )
        lo.train.set_epoch(3)
        batches = _epoch_labels(lo.train)
        assert len(lo.train) == len(batches) == n // gb
        assert all(len(b) == gb // world for b in batches)
        per_rank.append(batches)
    seen: list[int] = []
    for i, ref in enumerate(reference):
        # Global batch i is the concatenation of the ranks' slices, in rank order.
        joined = [s for r in range(world) for s in per_rank[r][i]]
        assert joined == ref
        seen.extend(joined)
    assert len(seen) == len(set(seen)) == (n // gb) * gb  # disjoint; last partial batch dropped


def test_epochs_reshuffle_and_are_reproducible() -> None:
    prep = _prepared(40)
    lo = build_loaders(prep, input_size=8, style="cifar", batch_size=8, mode="memory", seed=1)
    lo.train.set_epoch(0)
    e0 = _epoch_labels(lo.train)
    lo.train.set_epoch(1)
    e1 = _epoch_labels(lo.train)
    lo.train.set_epoch(0)
    assert _epoch_labels(lo.train) == e0
    assert e0 != e1
    assert sorted(sum(e0, [])) == sorted(sum(e1, [])) == list(range(40))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_counts_every_sample_exactly_once(world: int) -> None:
    n = 10
    prep = _prepared(n)
    seen = []
    for r in range(world):
        lo = build_loaders(
            prep,
            input_size=8,
            style="cifar",
            batch_size=3 * world,
            eval_batch_size=2 * world,
            rank=r,
            world_size=world,
            mode="memory",
        )
        for split in (lo.val, lo.test):
            labels = sum(_epoch_labels(split), [])
            assert len(labels) == split.num_samples
        seen.extend(sum(_epoch_labels(lo.val), []))
    assert sorted(seen) == list(range(n))


def test_resume_from_start_batch_is_exact() -> None:
    prep = _prepared(64)
    lo = build_loaders(prep, input_size=8, style="cifar", batch_size=8, mode="memory", seed=5)
    lo.train.set_epoch(2)
    full = list(lo.train)
    lo2 = build_loaders(prep, input_size=8, style="cifar", batch_size=8, mode="memory", seed=5)
    lo2.train.set_epoch(2)
    tail = list(lo2.train.iterate(start_batch=5))
    assert len(tail) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], tail, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_augmentation_shapes_ranges_and_seed() -> None:
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = random_crop_flip(x, 32, 4, g(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, random_crop_flip(x, 32, 4, g(0)))
    assert not torch.equal(a, random_crop_flip(x, 32, 4, g(1)))
    # Every output pixel is an input pixel of the same sample/channel or zero padding.
    for i in range(4):
        vals = set(x[i].flatten().tolist()) | {0}
        assert set(a[i].flatten().tolist()) <= vals
    r = random_resized_crop_flip(x, 24, g(0))
    assert r.shape == (16, 3, 24, 24) and r.dtype == torch.float32
    assert r.min() >= 0 and r.max() <= 255
    assert torch.equal(r, random_resized_crop_flip(x, 24, g(0)))

    aug = BatchAugment(
        style="cifar", train=True, input_size=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    y = aug(x, g(3))
    assert y.shape == (16, 3, 32, 32) and y.dtype == torch.float32
    assert y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6
    ev = BatchAugment(
        style="finetune",
        train=False,
        input_size=28,
        resize_size=32,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    e = ev(x)
    assert e.shape == (16, 3, 28, 28)
    # Eval at the storage size is a pure center crop + normalize.
    expect = (x[..., 2:30, 2:30].float() / 255 - 0.5) / 0.5
    assert torch.allclose(e, expect, atol=1e-5)


def test_crop_matches_torchvision_random_crop_candidates() -> None:
    """Each output is one of RandomCrop(10, padding=4)'s 81 crops (zero fill), maybe flipped."""
    x = torch.randint(1, 256, (6, 3, 10, 10), dtype=torch.uint8)
    a = random_crop_flip(x, 10, 4, torch.Generator().manual_seed(7))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        crops = [padded[i, :, dy : dy + 10, dx : dx + 10] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(a[i], c) or torch.equal(a[i], c.flip(-1)) for c in crops)


def test_crop_without_padding_is_identity_up_to_flip() -> None:
    x = torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8)
    a = random_crop_flip(x, 10, 0, torch.Generator().manual_seed(0))
    for i in range(8):
        assert torch.equal(a[i], x[i]) or torch.equal(a[i], x[i].flip(-1))


def test_flip_without_crop_matches_the_gather_path() -> None:
    """The no-crop shortcut (batch or its mirror, picked per sample) draws and returns exactly
    what the gather does: the same generator stream, so a seed's augmentations do not change."""
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    fast = random_crop_flip(x, 8, 0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 1, (16,), generator=g), torch.randint(0, 1, (16,), generator=g)  # dy, dx
    flips = torch.rand(16, generator=g) < 0.5
    assert 0 < int(flips.sum()) < 16
    assert torch.equal(fast, torch.where(flips[:, None, None, None], x.flip(-1), x))


def test_stream_path_matches_memory_sampling(tmp_path: Path) -> None:
    prep = _prepared(30)
    kw = dict(input_size=8, style="cifar", batch_size=6, world_size=2, rank=1, seed=4)
    mem = build_loaders(prep, mode="memory", **kw)
    stream = build_loaders(prep, mode="stream", num_workers=0, **kw)
    assert stream.mode == "stream" and mem.mode == "memory"
    for lo in (mem, stream):
        lo.train.set_epoch(1)
    assert _epoch_labels(mem.train) == _epoch_labels(stream.train)
    assert _epoch_labels(mem.val) == _epoch_labels(stream.val)
    xs = [x for x, _ in stream.train]
    assert all(x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 for x in xs)
    # Seeded per batch: resuming the stream reproduces the same augmented tensors.
    tail = [x for x, _ in stream.train.iterate(2)]
    assert all(torch.equal(a, b) for a, b in zip(xs[2:], tail, strict=True))
    # Eval transforms agree between paths (both are resize + center crop + normalize).
    for (xm, _), (xs_, _) in zip(mem.val, stream.val, strict=True):
        assert torch.allclose(xm, xs_, atol=1e-5)


def test_stream_workers_do_not_change_batches() -> None:
    """Per-batch seeding: 2 DataLoader worker processes give exactly the 0-worker batches."""
    prep = _prepared(24)
    kw = dict(input_size=8, style="finetune", batch_size=4, seed=2, mode="stream")
    a = build_loaders(prep, num_workers=0, **kw)
    b = build_loaders(prep, num_workers=2, **kw)
    for lo in (a, b):
        lo.train.set_epoch(5)
    for (xa, ya), (xb, yb) in zip(a.train, b.train, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_style_none_trains_on_the_eval_transform(mode: str) -> None:
    prep = _prepared(16)
    kw = dict(input_size=6, resize_size=8, style="none", batch_size=4, mode=mode, num_workers=0)
    lo = build_loaders(prep, **kw)  # resize_size == storage size: a pure center crop
    lo.train.set_epoch(0)
    (x, y), (xv, _) = next(iter(lo.train)), next(iter(lo.val))
    images = prep.split("train")[0]
    expect = (images[y][..., 1:7, 1:7].float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expect, atol=1e-5)
    assert torch.allclose(xv, (images[:4][..., 1:7, 1:7].float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_auto_mode_picks_stream_over_budget() -> None:
    prep = _prepared(20)
    small = build_loaders(prep, input_size=8, style="cifar", batch_size=4, memory_budget=10)
    big = build_loaders(prep, input_size=8, style="cifar", batch_size=4, memory_budget=10**9)
    assert small.mode == "stream" and big.mode == "memory"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(style="imagenet"), "style must be one of"),
        (dict(mode="gpu"), "mode must be one of"),
        (dict(batch_size=7, world_size=2), "multiple of world_size"),
        (dict(rank=2, world_size=2), "rank must be in"),
        (dict(batch_size=64), "larger than the training split"),
        (dict(normalize=((0.5, 0.5), (0.5, 0.5))), "normalize has 2 channel"),
        (dict(normalize=((0.5,) * 3, (0.5, 0.0, 0.5))), "std must be positive"),
        (dict(input_size=0), "input_size must be a positive integer"),
        (dict(resize_size=4), r"resize_size \(4\) must be >= input_size \(8\)"),
    ],
)
def test_bad_loader_arguments(kw: dict, match: str) -> None:
    args = dict(input_size=8, style="cifar", batch_size=4, mode="memory")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        build_loaders(_prepared(20), **args)


def test_start_batch_out_of_range() -> None:
    lo = build_loaders(_prepared(20), input_size=8, style="cifar", batch_size=4, mode="memory")
    with pytest.raises(ValueError, match="start_batch 9 out of range 0..5"):
        next(lo.train.iterate(9))


def test_end_to_end_imagefolder_loaders(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "ds", n_train=10, n_val=4, size=32)
    info = prepare_dataset("imagefolder", data_dir=tmp_path / "ds", cache_dir=tmp_path / "c")
    lo = build_loaders(info, input_size=32, style="cifar", batch_size=4, mode="memory")
    assert lo.classes == ["ants", "bees"] and lo.num_classes == 2 and lo.in_channels == 3
    lo.train.set_epoch(0)
    assert sum(len(y) for _, y in lo.train) == 20
    assert sum(len(y) for _, y in lo.test) == info.splits["test"] == 8
    # Normalized with the train split's own statistics: roughly zero mean, unit std.
    x = torch.cat([x for x, _ in lo.val])
    assert abs(float(x.mean())) < 0.5 and 0.5 < float(x.std()) < 1.5


def test_epoch_never_materializes_a_float_copy() -> None:
    """Peak RSS growth over a full epoch stays far below one float32 copy of the data (4x)."""
    import resource

    n = 8_000  # 25 MB of uint8; a float copy would be 98 MB
    prep = _prepared(n, size=32)
    lo = build_loaders(prep, input_size=32, style="cifar", batch_size=250, mode="memory")
    lo.train.set_epoch(0)
    next(iter(lo.train))  # warm up allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    count = sum(len(y) for _, y in lo.train) + sum(len(y) for _, y in lo.val)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert count == 2 * n
    # Only per-batch buffers (a few MB) may be added: far below a float copy (4 B/pixel).
    assert grown < 0.25 * (n * 3 * 32 * 32 * 4)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_style_flip_only_flips(mode: str) -> None:
    """style="flip": every training image is its stored pixels or their mirror, never shifted."""
    prep = _prepared(16)
    lo = build_loaders(prep, input_size=8, style="flip", batch_size=8, mode=mode, num_workers=0)
    lo.train.set_epoch(0)
    images = prep.split("train")[0]
    flipped = 0
    for x, y in lo.train:
        for xi, yi in zip(x, y, strict=True):
            plain = (images[yi].float() / 255 - 0.5) / 0.25
            same = torch.allclose(xi, plain, atol=1e-5)
            mirror = torch.allclose(xi, plain.flip(-1), atol=1e-5)
            assert same or mirror
            flipped += int(mirror and not same)
    assert flipped > 0  # the flip really happens
