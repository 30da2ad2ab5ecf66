"""The sharded streaming store for image folders that outgrow memory (LitData chunks).

Layout of a store (a local directory, a shared filesystem path, or an ``s3://`` prefix)::

    <store>/meta.json            format version, storage="shards", PreparedInfo, per-split sizes
    <store>/<split>/index.json   LitData's index of the split's chunks
    <store>/<split>/chunk-*.bin  samples {"image": JPEG bytes, "label": int}

Why LitData (measured against MosaicML ``streaming`` in ``benchmarks/bench_store.py``; figures
in docs/internals.md): ``optimize`` writes chunks from every core in bounded memory, the
dataset gives random access by global index locally and from object storage with a bounded
local chunk cache, and it is actively released. The *order* of samples is ours, not the
library's: ``loader.ShardPlan`` with the chunk-window permutation below keeps the in-memory
path's guarantees (global-batch-major DDP sharding, exact mid-epoch resume from a batch number,
exact evaluation) without a second sampler state to checkpoint.

Images are stored encoded, aspect ratio kept, shorter side capped (``images.encode_capped``);
``meta.json`` is written last and the directory is published by one rename (or, on S3, uploaded
after every chunk), so a half-written store is never picked up.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .images import JPEG_QUALITY, MAX_IMAGE_PIXELS, encode_capped

STORE_FORMAT = 2  # 2: samples stored in a seeded random order (1 was folder order)
# Shorter-side cap of stored images for 224-px training (see docs/internals.md for the
# measurement): RandomResizedCrop samples crops of 8-100% of the image, so a cap a little above
# the eval resize (256 for 224 px) keeps nearly all usable detail while the decode cost, which
# scales with the stored pixels, drops ~2x against 500x375 originals.
DEFAULT_CAP = 288
CHUNK_BYTES = "64MB"
LABELS_FILE = "labels.npy"  # per split, beside LitData's files: labels without reading images
SHUFFLE_WINDOW_CHUNKS = 8  # train permutation: shuffle chunk order, then within 8-chunk windows
_STATS_SAMPLE = 1024


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-storage URLs (``s3://...``), which go through LitData and boto3."""
    return str(path).startswith("s3://")


def _join(base: str | Path, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_remote(base) else str(Path(base, *parts))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_progress: Any = None  # a shared counter inherited by forked optimize workers


class PathTable:
    """File paths and labels packed into two numpy buffers (``table[i] -> (path, label)``).

    Why not a list of tuples: LitData's forked workers inherit the input list, and every access
    to a Python object writes its reference count, so each worker ends up with its own copy of
    every path object (~1-2 KB per image across workers and queues, measured with
    ``benchmarks/bench_store.py``); numpy buffers are read, never written, and stay shared.
    """

    def __init__(self, items: Sequence[tuple[str, int]]) -> None:
        encoded = [os.fsencode(p) for p, _ in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.fromiter((lab for _, lab in items), dtype=np.int64, count=len(items))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:
        path = self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes()
        return os.fsdecode(path), int(self.labels[i])


_BLOCK = 256  # images per optimize input: inputs are index ranges, not one object per image


def _encode_block(
    block: tuple[int, int], *, table: PathTable, cap: int, quality: int, max_pixels: int,
    bad_dir: str,
):  # fmt: skip
    """LitData ``optimize`` fn: images ``start..stop`` of ``table`` -> samples, in order; bad
    files are logged to ``bad_dir`` and reported by path once the split is written."""
    for i in range(*block):
        path, label = table[i]
        try:
            data, _, _ = encode_capped(path, cap, quality, max_pixels)
        except Exception as exc:  # reported by path after the split is written, never swallowed
            with open(os.path.join(bad_dir, f"{os.getpid()}.tsv"), "a") as f:
                f.write(f"{path}\t{type(exc).__name__}: {exc}\n".replace("\n", " ").strip() + "\n")
            data = None
        if _progress is not None:
            with _progress.get_lock():
                _progress.value += 1
        if data is not None:
            yield {"image": data, "label": label}


class _Progress:
    """Prints ``done/total, images/s, ETA`` every ``every`` seconds from a background thread."""

    def __init__(self, label: str, total: int, every: float = 15.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.stop = threading.Event()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            done = _progress.value
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            print(
                f"prepare {self.label}: {done}/{self.total} images, {rate:.0f} images/s, "
                f"ETA {eta:.0f} s",
                flush=True,
            )

    def __enter__(self) -> _Progress:
        global _progress
        _progress = mp.get_context("fork").Value("q", 0) if sys.platform == "linux" else None
        if _progress is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        global _progress
        self.stop.set()
        _progress = None


def write_split(
    items: PathTable | Sequence[tuple[str, int]],
    out_dir: Path,
    *,
    cap: int,
    quality: int = JPEG_QUALITY,
    max_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
    label: str = "",
) -> list[tuple[str, str]]:
    """Encode ``items`` into LitData chunks in ``out_dir``; return the (path, reason) of bad files.

    Workers are forked (no torch re-import per worker) and each gets a contiguous part of
    ``items`` (``keep_data_ordered``), so sample ``i`` of the store is a deterministic function
    of the input order and the worker count. Memory is bounded by one chunk per worker.
    """
    from litdata import optimize  # lazy: only the shard path needs it

    _preimport_chunk_writer()

    blocks_n = -(-len(items) // _BLOCK)
    workers = max(1, min(workers or os.cpu_count() or 1, blocks_n))
    bad_dir = Path(tempfile.mkdtemp(prefix=".bad-", dir=out_dir.parent))
    try:
        table = items if isinstance(items, PathTable) else PathTable(items)
        fn = functools.partial(
            _encode_block, table=table, cap=cap, quality=quality, max_pixels=max_pixels,
            bad_dir=str(bad_dir),
        )  # fmt: skip
        blocks = [(i, min(i + _BLOCK, len(table))) for i in range(0, len(table), _BLOCK)]
        with _Progress(label, len(table)):
            optimize(
                fn=fn,
                inputs=blocks,
                output_dir=str(out_dir),
                chunk_bytes=CHUNK_BYTES,
                num_workers=workers,
                start_method="fork" if sys.platform == "linux" else None,
                keep_data_ordered=True,
                reorder_files=False,
                mode="overwrite",
                verbose=False,
            )
        bad = []
        for f in sorted(bad_dir.iterdir()):
            for line in f.read_text().splitlines():
                path, _, reason = line.partition("\t")
                bad.append((path, reason))
        return sorted(bad)
    finally:
        shutil.rmtree(bad_dir, ignore_errors=True)


def _preimport_chunk_writer() -> None:
    """Import what LitData's chunk writer imports lazily, once, before the workers fork.

    With pyarrow installed LitData writes each chunk as an Arrow table, and importing pyarrow
    (and the pandas it pulls in) inside every forked worker cost ~5 s per worker per split.
    """
    for name in ("pyarrow", "pandas"):
        with contextlib.suppress(ImportError):
            __import__(name)


def read_index(split_dir: str | Path) -> list[int]:
    """Samples per chunk, in store order, from a split's LitData ``index.json``."""
    index = json.loads(_read_text(_join(split_dir, "index.json")))
    return [int(c["chunk_size"]) for c in index["chunks"]]


def sample_stats(
    split_dir: str | Path, n: int, seed: int, sample: int = _STATS_SAMPLE
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (0..1 scale) of a seeded sample of stored images, in bounded memory."""
    from litdata import StreamingDataset
    from torchvision.io import ImageReadMode, decode_jpeg

    ds = StreamingDataset(str(split_dir))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    hist = torch.zeros(3, 256, dtype=torch.float64)
    for i in idx.tolist():
        x = decode_jpeg(_as_tensor(ds[i]["image"]), mode=ImageReadMode.RGB)
        for c in range(3):
            hist[c] += torch.bincount(x[c].reshape(-1).to(torch.int64), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(1).clamp_min(1)
    mean = (hist * values).sum(1) / count
    std = ((hist * (values - mean[:, None]).square()).sum(1) / count).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Publishing and opening (local or s3://)
# --------------------------------------------------------------------------------------------


def _s3_client() -> Any:
    """boto3 client; the endpoint comes from the standard ``AWS_ENDPOINT_URL(_S3)`` settings."""
    import boto3

    return boto3.client("s3")


def _allow_plain_http_endpoint() -> None:
    """Let LitData's obstore downloader reach an ``http://`` endpoint (MinIO, a local server).

    boto3 accepts ``AWS_ENDPOINT_URL=http://...`` as is; obstore, which LitData 0.2.76 uses for
    chunk downloads, refuses plain HTTP unless its client option ``allow_http`` is set, and
    LitData passes fixed client options (no setting reaches them): every download then fails
    with "builder error". So the option is added to that dict, for http endpoints only.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint.startswith("http://"):
        from litdata.streaming import downloader

        options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
        if isinstance(options, dict):
            options["allow_http"] = True


def _split_url(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key.rstrip("/")


def _read_text(path: str) -> str:
    if is_remote(path):
        bucket, key = _split_url(path)
        obj = _s3_client().get_object(Bucket=bucket, Key=key)
        return obj["Body"].read().decode()
    return Path(path).read_text()


def store_exists(path: str | Path) -> bool:
    """True when a complete store (its ``meta.json``) is at ``path``."""
    if not is_remote(path):
        return (Path(path) / "meta.json").exists()
    bucket, key = _split_url(_join(path, "meta.json"))
    try:
        _s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:  # botocore ClientError 404; anything else is a real error
        if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return False
        raise


def upload_store(local: Path, url: str) -> None:
    """Upload a finished local store to ``url``; ``meta.json`` goes last (the publish marker)."""
    client = _s3_client()
    bucket, prefix = _split_url(url)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != "meta.json")
    for p in [*files, local / "meta.json"]:
        client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of a store, refusing another format version with the fix."""
    meta = json.loads(_read_text(_join(path, "meta.json")))
    if meta.get("storage") != "shards" or meta.get("format") != STORE_FORMAT:
        raise ValueError(
            f"{path} was written by shard store format {meta.get('format')!r}, this code reads "
            f"{STORE_FORMAT}; delete it and re-run prepare (`cnnpipe prepare ...`)"
        )
    return meta


# --------------------------------------------------------------------------------------------
# Reading: the chunk-window permutation and the per-sample dataset
# --------------------------------------------------------------------------------------------


def chunk_window_permutation(
    chunk_sizes: Sequence[int], generator: torch.Generator, window: int = SHUFFLE_WINDOW_CHUNKS
) -> torch.Tensor:
    """A permutation of every sample that touches ~``window`` chunks at a time.

    Chunk order is shuffled, then samples are shuffled within each window of ``window``
    consecutive (shuffled) chunks. Streaming from object storage then downloads each chunk once
    per epoch instead of once per sample, while every sample is still seen exactly once.
    """
    starts = torch.tensor([0, *np.cumsum(chunk_sizes).tolist()], dtype=torch.int64)
    order = torch.randperm(len(chunk_sizes), generator=generator).tolist()
    parts = []
    for w in range(0, len(order), window):
        idx = torch.cat([torch.arange(starts[c], starts[c + 1]) for c in order[w : w + window]])
        parts.append(idx[torch.randperm(len(idx), generator=generator)])
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


class StoreSplit:
    """Random access to one split of a store: ``split[i] -> (JPEG bytes, label)``.

    The LitData dataset is opened lazily in each process that reads (DataLoader workers), so
    the object pickles as a few strings.
    """

    def __init__(self, url: str, size: int, chunk_sizes: list[int], cache_dir: str | None = None):
        self.url, self.size, self.chunk_sizes, self.cache_dir = url, size, chunk_sizes, cache_dir
        # Opened here, in the process that builds the loaders: for a remote store LitData
        # downloads index.json now, before DataLoader workers start (they inherit the object,
        # or re-open it from the local cache when unpickled).
        self._ds: Any = self._open()

    def _open(self) -> Any:
        from litdata import StreamingDataset

        if is_remote(self.url):
            _allow_plain_http_endpoint()
        ds = StreamingDataset(self.url, cache_dir=self.cache_dir)
        # Download whole chunks (our permutation reads a chunk window at a time) instead of
        # one ranged GET per sample, which LitData 0.2.76 also cannot do for the Arrow chunks
        # it writes when pyarrow is installed (it returns empty bytes). The public setter
        # needs the reader, which exists only after a first read.
        ds._on_demand_bytes = False
        return ds

    def __len__(self) -> int:
        return self.size

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None}

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        if self._ds is None:
            self._ds = self._open()
        item = self._ds[int(i)]
        return item["image"], int(item["label"])

    def labels(self) -> torch.Tensor:
        """Every label of the split, in store order (``labels.npy``, written at prepare)."""
        path = _join(self.url, LABELS_FILE)
        if is_remote(path):
            bucket, key = _split_url(path)
            data = _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
            arr = np.load(io.BytesIO(data))
        else:
            arr = np.load(path)
        return torch.from_numpy(arr.astype(np.int64))

    def images(self, size: int) -> SplitImages:
        """The split's images as a lazily decoded, sliceable uint8 (N, 3, size, size) view."""
        return SplitImages(self, size)


class SplitImages:
    """``images[a:b]`` / ``images[[i, j]]`` -> uint8 (n, 3, size, size), decoded on demand.

    What consumers of the in-memory tensor (sample grids, input examples, evaluating an
    exported model) slice, without holding a large split in memory. Each image is the center
    square of the stored image resized to ``size``: an exported model's own resize + center crop
    of that square is the same region as of the stored image itself.
    """

    def __init__(self, split: StoreSplit, size: int) -> None:
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: Any) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        from torchvision.io import ImageReadMode, decode_jpeg

        if isinstance(key, slice):
            idx = range(*key.indices(len(self)))
        elif isinstance(key, torch.Tensor):
            idx = key.flatten().tolist()
        else:
            idx = list(key)
        out = torch.empty((len(idx), 3, self.size, self.size), dtype=torch.uint8)
        for k, i in enumerate(idx):
            x = decode_jpeg(_as_tensor(self.split[int(i)][0]), mode=ImageReadMode.RGB)
            side = min(x.shape[-2:])
            x = TF.center_crop(x, [side, side])
            out[k] = TF.resize(x, [self.size, self.size], antialias=True)
        return out


def split_arrays(info: Any, split: str) -> tuple[Any, torch.Tensor]:
    """(images, labels) of a prepared split, whatever its storage: the in-memory tensors, or a
    ``SplitImages`` view of a shard store (square at the stored cap) with the stored labels.
    ``info`` is a ``PreparedInfo`` or the path of a cache directory or store."""
    if isinstance(info, (str, os.PathLike)):
        from .prepare import _read_info

        info = _read_info(info)
    if getattr(info, "storage", "memory") != "shards":
        from .prepare import load_prepared

        return load_prepared(info.path).split(split)
    part = open_store(info.path).splits[split]
    return part.images(int(info.resolution)), part.labels()


@dataclass
class Store:
    """An opened store: its metadata and one ``StoreSplit`` per split (test may alias val)."""

    path: str
    meta: dict
    splits: dict[str, StoreSplit]


def open_store(path: str | Path, cache_dir: str | None = None) -> Store:
    """Open a published store (local directory or ``s3://`` prefix)."""
    path = str(path)
    meta = read_meta(path)
    splits = {}
    for name in meta["stored_splits"]:
        url = _join(path, name)
        sizes = read_index(url)
        splits[name] = StoreSplit(url, sum(sizes), sizes, cache_dir)
    if meta["info"].get("test_is_val") and "test" not in splits:
        splits["test"] = splits["val"]
    return Store(path, meta, splits)
