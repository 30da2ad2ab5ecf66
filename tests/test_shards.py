"""The sharded streaming store (issue 11): format choice, prepare, loaders, failures, S3."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from fakedata import make_imagefolder
from PIL import Image

from cnn.data import build_loaders, prepare_dataset, shards
from cnn.data.images import encode_capped, open_checked
from cnn.data.prepare import choose_storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of photos of varying size and aspect ratio, JPEG and PNG, train only."""
    root = tmp_path_factory.mktemp("photos")
    return make_imagefolder(
        root,
        classes=("a", "b", "c"),
        n_train=24,
        size=(40, 120),
        formats=("jpg", "png"),
        splits=("train",),
    )


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare_dataset(
        "imagefolder", data_dir=folder, cache_dir=cache, storage="shards", image_cap=64
    )


def test_choose_storage_by_memory_budget():
    assert choose_storage("auto", 1000, 256, budget=10**9) == "memory"  # 197 MB
    assert choose_storage("auto", 100_000, 256, budget=10**9) == "shards"  # 19.7 GB
    assert choose_storage("memory", 100_000, 256, budget=1) == "memory"
    assert choose_storage("shards", 10, 32, budget=10**12) == "shards"


def test_auto_picks_shards_when_budget_is_small(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNPIPE_MEMORY_BUDGET_MB", "0.01")
    info = prepare_dataset("imagefolder", data_dir=folder, cache_dir=tmp_path, image_cap=48)
    assert info.storage == "shards"
    monkeypatch.setenv("CNNPIPE_MEMORY_BUDGET_MB", "1000")
    info = prepare_dataset("imagefolder", data_dir=folder, cache_dir=tmp_path, resolution=32)
    assert info.storage == "memory"


def test_bad_storage_value_is_named(folder, tmp_path):
    with pytest.raises(ValueError, match="storage must be one of auto, memory, shards, got 'disk'"):
        prepare_dataset("imagefolder", data_dir=folder, cache_dir=tmp_path, storage="disk")
    assert not any(tmp_path.iterdir())


def test_store_metadata_and_cache_hit(store, folder):
    assert store.storage == "shards" and not store.cache_hit
    assert store.splits == {"train": 66, "val": 6, "test": 6}  # 72 images, 2 per class held out
    assert store.test_is_val and store.classes == ["a", "b", "c"]
    assert store.resolution == 64 and len(store.mean) == 3 and all(0 < s < 1 for s in store.std)
    meta = json.loads((Path(store.path) / "meta.json").read_text())
    assert meta["format"] == shards.STORE_FORMAT and meta["storage"] == "shards"
    again = prepare_dataset(
        "imagefolder",
        data_dir=folder,
        cache_dir=Path(store.path).parent,
        storage="shards",
        image_cap=64,
    )
    assert again.cache_hit and again.path == store.path and again.decoded_images == 0
    assert not list(Path(store.path).parent.glob(".tmp-*"))


def test_stored_images_keep_aspect_ratio_and_small_jpegs_verbatim(store, folder):
    s = shards.open_store(store.path)
    seen = 0
    for i in range(len(s.splits["train"])):
        data, label = s.splits["train"][i]
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and min(img.size) <= 64 and 0 <= label < 3
        seen += 1
    assert seen == 66
    labels = s.splits["train"].labels()
    assert labels.tolist() == [s.splits["train"][i][1] for i in range(66)]
    images, labels = shards.split_arrays(store, "val")
    assert images[:4].shape == (4, 3, 64, 64) and images[[1, 3]].dtype == torch.uint8
    assert len(images) == len(labels) == 6
    small = next(folder.glob("train/a/*.jpg"))
    with Image.open(small) as im:
        fits = min(im.size) <= 200
    data, h, w = encode_capped(small, 200)
    assert fits and data == small.read_bytes()  # stored byte for byte
    data, h, w = encode_capped(small, 30)
    with Image.open(small) as im:
        ow, oh = im.size
    assert min(h, w) == 30 and abs(w / h - ow / oh) < 0.1


def test_loaders_cover_every_sample_once_per_epoch_across_ranks(store):
    seen = []
    for rank in range(2):
        L = build_loaders(
            store,
            input_size=32,
            style="finetune",
            batch_size=8,
            rank=rank,
            world_size=2,
            num_workers=0,
        )
        assert L.mode == "stream" and L.num_classes == 3
        L.train.set_epoch(3)
        idx: list[torch.Tensor] = []
        L.train.trace = lambda i, ix, idx=idx: idx.append(ix)
        for x, y in L.train:
            assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and len(y) == 4
        seen.append(torch.cat(idx))
    both = torch.cat(seen)
    assert len(both) == (66 // 8) * 8 and len(set(both.tolist())) == len(both)


def test_eval_is_exact_under_ddp(store):
    n = 0
    for rank in range(3):
        L = build_loaders(
            store,
            input_size=32,
            style="finetune",
            batch_size=6,
            eval_batch_size=6,
            rank=rank,
            world_size=3,
            num_workers=0,
        )
        n += sum(len(y) for _, y in L.val)
    assert n == store.splits["val"]


@pytest.mark.parametrize("decoder", ["pil", "torchvision", "device"])
def test_decoders_agree_on_eval_and_resume_exactly(store, decoder):
    kw = dict(input_size=32, style="finetune", batch_size=8, num_workers=0)
    ref = build_loaders(store, decoder="torchvision", **kw)
    L = build_loaders(store, decoder=decoder, **kw)
    a = torch.cat([x for x, _ in ref.val])
    b = torch.cat([x for x, _ in L.val])
    assert a.shape == b.shape
    # PIL's DCT-scaled box resize is a different resampler: close, not identical.
    assert (a - b).abs().mean() < (0.35 if decoder == "pil" else 1e-6)
    L.train.set_epoch(1)
    full = list(L.train)
    L.train.set_epoch(1)
    tail = list(L.train.iterate(start_batch=3))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(full[3:], tail, strict=True))


def test_two_workers_match_zero_workers(store):
    kw = dict(input_size=32, style="finetune", batch_size=8)
    a = build_loaders(store, num_workers=0, **kw)
    b = build_loaders(store, num_workers=2, **kw)
    a.train.set_epoch(0)
    b.train.set_epoch(0)
    for (xa, ya), (xb, yb) in zip(a.train, b.train, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_chunk_window_permutation_is_a_permutation():
    g = torch.Generator().manual_seed(0)
    sizes = [5, 7, 3, 9, 1, 4]
    p = shards.chunk_window_permutation(sizes, g, window=2)
    assert sorted(p.tolist()) == list(range(sum(sizes)))


def test_corrupt_image_is_named_and_fails_unless_skipped(folder, tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src, classes=("a", "b"), n_train=5, n_val=1, size=48, formats=("jpg",))
    bad = src / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = next((src / "train" / "a").glob("*.jpg"))
    (src / "train" / "a" / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    cache = tmp_path / "cache"
    with pytest.raises(
        ValueError, match=r"(?s)2 unreadable image\(s\).*--skip-bad-images.*broken\.jpg"
    ):
        prepare_dataset("imagefolder", data_dir=src, cache_dir=cache, storage="shards")
    assert not list(cache.glob("imagefolder-*")) and not list(cache.glob(".tmp-*"))
    info = prepare_dataset(
        "imagefolder", data_dir=src, cache_dir=cache, storage="shards", skip_bad_images=True
    )
    assert info.skipped_bad_images == 2 and info.splits["train"] + info.splits["val"] == 12


def _huge_png(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(raw))


def test_pixel_limit_refuses_from_the_header(tmp_path):
    big = tmp_path / "bomb.png"
    _huge_png(big, 30000, 30000)
    t0 = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"bomb\.png is 30000x30000 = 900,000,000 pixels.*max_image_pixels"
    ):
        open_checked(big)
    assert time.perf_counter() - t0 < 1.0
    src = tmp_path / "src"
    make_imagefolder(
        src, classes=("a", "b"), n_train=4, size=32, formats=("png",), splits=("train",)
    )
    _huge_png(src / "train" / "a" / "bomb.png", 30000, 30000)
    for storage in ("memory", "shards"):
        with pytest.raises(ValueError, match="bomb.png is 30000x30000"):
            prepare_dataset("imagefolder", data_dir=src, cache_dir=tmp_path / "c", storage=storage)
    # Raising the limit lets the header through (this PNG's data is then found truncated).
    with pytest.raises(ValueError, match="unreadable") as e:
        prepare_dataset(
            "imagefolder",
            data_dir=src,
            cache_dir=tmp_path / "c",
            storage="shards",
            max_image_pixels=10**10,
        )
    assert "pixels, above the limit" not in str(e.value)


def test_other_format_version_is_refused(store, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(store.path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["format"] = 0
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shard store format 0.*re-run prepare"):
        build_loaders(copy, input_size=32, style="finetune", batch_size=8)


def test_killed_prepare_leaves_nothing_usable_and_rerun_finishes(tmp_path):
    src = make_imagefolder(
        tmp_path / "src",
        classes=("a", "b"),
        n_train=150,
        size=(200, 300),
        formats=("png",),
        splits=("train",),
    )
    cache = tmp_path / "cache"
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from cnn.data import prepare_dataset\n"
        f"prepare_dataset('imagefolder', data_dir={str(src)!r}, cache_dir={str(cache)!r}, "
        "storage='shards', workers=1)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any((d / "train").exists() for d in cache.glob(".tmp-*")):
        time.sleep(0.05)
    assert p.poll() is None, "prepare finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert list(cache.glob(".tmp-*")) and not list(cache.glob("imagefolder-*"))
    with pytest.raises(FileNotFoundError):
        build_loaders(cache / "imagefolder-x", input_size=32, style="finetune", batch_size=8)
    info = prepare_dataset("imagefolder", data_dir=src, cache_dir=cache, storage="shards")
    assert info.splits["train"] + info.splits["val"] == 300
    assert not list(cache.glob(".tmp-*"))  # the dead prepare's staging dir was removed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, in its own process."""
    pytest.importorskip("moto")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LITDATA_CACHE_DIR": str(tmp_path / "litdata"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    import boto3

    boto3.client("s3").create_bucket(Bucket="stores")
    yield url
    proc.terminate()
    proc.wait(10)


def test_store_on_s3_streams_through_litdata(folder, s3_server, tmp_path):
    info = prepare_dataset(
        "imagefolder",
        data_dir=folder,
        cache_dir="s3://stores/cache",
        storage="shards",
        image_cap=64,
    )
    assert info.path.startswith("s3://stores/cache/imagefolder-") and not info.cache_hit
    again = prepare_dataset(
        "imagefolder",
        data_dir=folder,
        cache_dir="s3://stores/cache",
        storage="shards",
        image_cap=64,
    )
    assert again.cache_hit and again.path == info.path
    L = build_loaders(
        info,
        input_size=32,
        style="finetune",
        batch_size=8,
        num_workers=2,
        stream_cache_dir=str(tmp_path / "chunks"),
    )
    L.train.set_epoch(0)
    n = sum(len(y) for _, y in L.train)
    assert n == (66 // 8) * 8
    assert sum(len(y) for _, y in L.val) == 6


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("storage=disk", "storage='disk' is not valid; choose one of auto, memory, shards"),
        ("image_cap=3", "image_cap must be an integer >= 8 (pixels), got 3"),
        ("max_image_pixels=0", "max_image_pixels=0 must be >= 1"),
        ("lr=0.1", "cnnpipe prepare --set accepts storage, image_cap, max_image_pixels; got lr"),
    ],
)
def test_cli_prepare_rejects_bad_settings_in_one_line(folder, tmp_path, capsys, setting, needle):
    from flows.cli import main

    cache = tmp_path / "cache"
    argv = ["prepare", "--dataset", "imagefolder", "--data-dir", str(folder),
            "--cache-dir", str(cache), "--set", setting]  # fmt: skip
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and needle in lines[0], err
    assert not cache.exists()


def test_cli_prepare_builds_a_shard_store(folder, tmp_path, capsys):
    from flows.cli import main

    argv = ["prepare", "--dataset", "imagefolder", "--data-dir", str(folder), "--cache-dir",
            str(tmp_path / "c"), "--set", "storage=shards", "--set", "image_cap=40",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["storage"] == "shards" and info["resolution"] == 40
    assert (Path(info["path"]) / "train" / "index.json").exists()
