"""Prepare: decode a source once into a uint8 tensor cache, keyed by content and parameters.

Cache layout (docs/internals.md): ``<cache_dir>/<dataset>-<key>/`` with ``meta.json`` and one
``<split>.pt`` per split holding ``{"images": uint8 N,C,H,W, "labels": int64 N}``. A directory
at that path is always complete: it is written under a temporary name, fsynced, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..atomic import atomic_write_json, fsync_dir
from . import shards
from .images import MAX_IMAGE_PIXELS, decode_file
from .info import FORMAT_VERSION, PreparedInfo
from .sources import (
    DATASETS,
    FolderScan,
    RawSplit,
    SourceSpec,
    fetch_source,
    get_source,
    read_source,
    scan_imagefolder,
)

log = logging.getLogger(__name__)

STORAGES = ("auto", "memory", "shards")
DEFAULT_RESOLUTION = 256  # shorter side for 224-pixel models; 32-px images stay 32 (no upscale)
_HEADER_SAMPLE = 512  # images whose headers pick the storage size of an image folder


@dataclass
class Prepared:
    """A loaded cache: metadata plus per-split (images uint8 N,C,H,W, labels int64 N)."""

    info: PreparedInfo
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.splits:
            raise KeyError(f"split {name!r} not in {self.info.path}; have {sorted(self.splits)}")
        return self.splits[name]


# --------------------------------------------------------------------------------------------
# Validation and keys
# --------------------------------------------------------------------------------------------


def _check_params(
    resolution: int | None, val_fraction: float, seed: int, storage: str = "auto"
) -> None:
    if storage not in STORAGES:
        raise ValueError(
            f"storage must be one of {', '.join(STORAGES)}, got {storage!r}; auto picks shards "
            "when the decoded images would not fit the memory budget"
        )
    if resolution is not None and (not isinstance(resolution, int) or resolution < 8):
        raise ValueError(f"resolution must be an integer >= 8 (pixels), got {resolution!r}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; "
            "0.1 holds out 10% of train"
        )
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def memory_budget_bytes(device: torch.device | None = None) -> int:
    """Budget for in-memory data: half the free GPU memory, or half the available RAM.

    ``CNNPIPE_MEMORY_BUDGET_MB`` overrides it (used by prepare's storage choice and by the
    loader's memory/stream choice).
    """
    env = os.environ.get("CNNPIPE_MEMORY_BUDGET_MB")
    if env:
        return int(float(env) * 2**20)
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2**30


def choose_storage(storage: str, n_images: int, resolution: int, budget: int | None = None) -> str:
    """``memory`` when the decoded uint8 images (N x 3 x S x S) fit the budget, else ``shards``."""
    if storage != "auto":
        return storage
    budget = memory_budget_bytes() if budget is None else budget
    return "memory" if n_images * 3 * resolution * resolution <= budget else "shards"


def cache_key(**parts: object) -> str:
    """A short stable hash of everything that changes the prepared output."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Decoding (image folders)
# --------------------------------------------------------------------------------------------


def _fit(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased) and center-crop a square; uint8 CHW."""
    if x.shape[-2:] == (size, size):
        return x
    import torchvision.transforms.v2.functional as TF  # here: see cnn.data's docstring

    x = TF.resize(x, size, antialias=True)
    return TF.center_crop(x, [size, size])


def _decode_one(path: str, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode one file (see ``images.decode_file``) and fit it to ``size`` x ``size``."""
    return _fit(decode_file(path, size, max_pixels), size)


def _decode_chunk(
    args: tuple[list[str], int, int],
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: decode paths into (n, 3, size, size); report (index, error) of bad files.

    Returns NumPy (plain pickled bytes back to the parent) rather than a tensor, which
    multiprocessing would pass through a shared-memory file descriptor per chunk.
    """
    paths, size, max_pixels = args
    out = torch.zeros((len(paths), 3, size, size), dtype=torch.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            out[i] = _decode_one(p, size, max_pixels)
        except Exception as exc:  # any decode failure is reported by path, never swallowed
            bad.append((i, f"{type(exc).__name__}: {exc}"))
    return out.numpy(), bad


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core already


def _pool_context() -> mp.context.BaseContext:
    # fork: workers inherit the loaded modules (no torch re-import per worker). Like
    # DataLoader workers, each one sets torch to one thread (see _worker_init).
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return mp.get_context()


def decode_images(
    paths: list[Path],
    size: int,
    *,
    workers: int | None = None,
    label: str = "",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, list[tuple[Path, str]]]:
    """Decode ``paths`` in parallel into uint8 (N, 3, size, size); also return the bad files.

    Bad files keep a zero image at their index; the caller drops or reports them.
    """
    workers = workers or os.cpu_count() or 1
    n = len(paths)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    chunk = max(16, min(512, math.ceil(n / (workers * 8)) if n else 16))
    jobs = [([str(p) for p in paths[i : i + chunk]], size, max_pixels) for i in range(0, n, chunk)]
    bad: list[tuple[Path, str]] = []
    t0 = time.perf_counter()
    done = 0
    last_print = t0

    def collect(start: int, arr: np.ndarray, errs: list[tuple[int, str]]) -> None:
        nonlocal done, last_print
        out[start : start + len(arr)] = torch.from_numpy(arr)
        bad.extend((paths[start + i], msg) for i, msg in errs)
        done += len(arr)
        now = time.perf_counter()
        if now - last_print > 5 or done == n:
            last_print = now
            print(
                f"decoded {done}/{n} {label} images ({done / max(now - t0, 1e-9):.0f}/s)",
                flush=True,
            )

    if workers <= 1 or len(jobs) <= 1:
        for j, job in enumerate(jobs):
            collect(j * chunk, *_decode_chunk(job))
    else:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=_pool_context(), initializer=_worker_init
        ) as pool:
            for j, (arr, errs) in enumerate(pool.map(_decode_chunk, jobs)):
                collect(j * chunk, arr, errs)
    return out, bad


def _storage_size(paths: list[Path], requested: int, seed: int) -> int:
    """The square storage size: ``requested``, but never above the typical image.

    Reads only the headers of a seeded sample of images. The median shorter side is used, not
    the minimum, so one tiny outlier (e.g. an icon) cannot shrink the whole dataset; images
    smaller than the result are upscaled individually at prepare time.
    """
    if not paths:
        return requested
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(paths), size=min(_HEADER_SAMPLE, len(paths)), replace=False)
    sides = []
    for i in idx:
        try:
            with Image.open(paths[i]) as img:
                sides.append(min(img.size))
        except Exception:  # bad files are reported by the decode pass, with their path
            continue
    if not sides:
        return requested
    return int(min(requested, int(np.median(sides))))


# --------------------------------------------------------------------------------------------
# Splits and statistics
# --------------------------------------------------------------------------------------------


def stratified_holdout(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, per-class hold-out: (train indices, val indices), each in ascending order.

    Each class gives ``round(n_c * fraction)`` samples (at least one when it has two or more).
    """
    g = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * fraction)
        if len(idx) >= 2:
            n_val = max(1, min(n_val, len(idx) - 1))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std on the 0..1 scale, exact, from 256-bin histograms.

    Counting uint8 values is ~5x faster than summing a float64 copy and needs no float copy of
    the dataset at all.
    """
    c = images.shape[1]
    hist = torch.zeros(c, 256, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk]
        for ch in range(c):
            hist[ch] += torch.bincount(x[:, ch].reshape(-1).to(torch.int64), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(1).clamp_min(1)
    mean = (hist * values).sum(1) / count
    var = (hist * (values - mean[:, None]).square()).sum(1) / count
    std = var.clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


# --------------------------------------------------------------------------------------------
# Cache I/O
# --------------------------------------------------------------------------------------------


def _staging_dir(final: Path) -> Path:
    """A fresh temporary directory next to ``final``; stale ones of dead prepares are removed.

    The name carries the writer's pid, so a prepare that was killed half-way leaves a directory
    the next prepare recognises as abandoned (its pid no longer runs) and deletes.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".tmp-{final.name}-*"):
        try:
            pid = int(old.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it to ``final``; a concurrent writer's identical copy wins."""
    fsync_dir(tmp)
    try:
        os.replace(tmp, final)
    except OSError:
        if (final / "meta.json").exists():  # a concurrent prepare won the race: same content
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise
    fsync_dir(final.parent)


def _write_cache(final: Path, splits: dict[str, RawSplit], meta: dict) -> None:
    """Write splits + meta.json to a temp dir next to ``final``, fsync, and rename into place."""
    tmp = _staging_dir(final)
    try:
        for name, s in splits.items():
            p = tmp / f"{name}.pt"
            with open(p, "wb") as f:
                torch.save({"images": s.images.contiguous(), "labels": s.labels}, f)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(tmp / "meta.json", meta, indent=1)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_info(path: Path | str, meta: dict | None = None) -> PreparedInfo:
    if shards.is_remote(path) or (meta or {}).get("storage") == "shards":
        meta = shards.read_meta(path) if meta is None else meta
        return PreparedInfo.from_dict({**meta["info"], "path": str(path), "cache_hit": True})
    meta = meta if meta is not None else json.loads((Path(path) / "meta.json").read_text())
    if meta.get("storage") == "shards":
        return _read_info(path, meta)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by cache format {meta.get('format')}, this code reads "
            f"{FORMAT_VERSION}; delete it and prepare again"
        )
    return PreparedInfo.from_dict({**meta["info"], "path": str(path), "cache_hit": True})


def load_prepared(path: str | Path) -> Prepared:
    """Open a cache directory (or its meta.json): tensors are memory-mapped, not copied."""
    path = Path(path)
    if path.name == "meta.json":
        path = path.parent
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{path} is not a prepared dataset (no meta.json); run `cnnpipe prepare` first"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("storage") == "shards":
        raise ValueError(
            f"{path} is a shard store (streamed, not loaded into memory); open it with "
            "cnn.data.shards.open_store or build_loaders"
        )
    info = _read_info(path, meta)
    splits = {}
    for name in meta["stored_splits"]:
        d = torch.load(path / f"{name}.pt", mmap=True, weights_only=True)
        splits[name] = (d["images"], d["labels"])
    if info.test_is_val and "test" not in splits and "val" in splits:
        splits["test"] = splits["val"]
    return Prepared(info, splits)


# --------------------------------------------------------------------------------------------
# prepare_dataset
# --------------------------------------------------------------------------------------------


def prepare_dataset(
    dataset: str | SourceSpec,
    *,
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    resolution: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
    download: bool = True,
    mirror: str | None = None,
    workers: int | None = None,
    storage: str = "auto",
    image_cap: int | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> PreparedInfo:
    """Decode ``dataset`` once into the uint8 tensor cache; a second call is a cache hit.

    ``dataset`` is a name (``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``,
    ``imagefolder``) or a ``SourceSpec`` (e.g. a test's own files and md5s). ``cache_dir``
    defaults to ``<data_dir>/cache``. ``resolution`` applies to image folders only (CIFAR and
    MNIST are stored at their native size); see ``_storage_size`` for the never-upscale rule.
    ``workers`` decode processes (default: all cores).

    ``storage`` (image folders): ``memory`` (the uint8 tensor cache), ``shards`` (the streaming
    JPEG store of ``shards.py``, shorter side capped at ``image_cap``, default
    ``shards.DEFAULT_CAP``) or ``auto`` (shards when the decoded images would not fit the
    memory budget, see ``choose_storage``). ``cache_dir`` may be an ``s3://`` prefix for a
    shard store. Images above ``max_image_pixels`` are refused from their header.
    """
    t0 = time.perf_counter()
    _check_params(resolution, val_fraction, seed, storage)
    if image_cap is not None and (not isinstance(image_cap, int) or image_cap < 8):
        raise ValueError(f"image_cap must be an integer >= 8 (pixels), got {image_cap!r}")
    if data_dir is None:
        raise ValueError("data_dir is required (the folder with the source data or downloads)")
    data_dir = Path(data_dir)
    if cache_dir is None:
        cache_dir = data_dir / "cache"
    elif not shards.is_remote(cache_dir):
        cache_dir = Path(cache_dir)

    if isinstance(dataset, SourceSpec):
        spec: SourceSpec | None = dataset
        name = spec.name
    elif isinstance(dataset, str) and dataset.lower() == "imagefolder":
        spec, name = None, "imagefolder"
    elif isinstance(dataset, str):
        spec = get_source(dataset)
        name = spec.name
    else:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")

    if spec is None:
        scan = scan_imagefolder(data_dir)
        source_hash = scan.content_hash
        n_images = sum(len(v) for v in scan.files.values())
        kind = choose_storage(storage, n_images, resolution or DEFAULT_RESOLUTION)
        if kind == "shards":
            params = {
                "storage": "shards",
                "image_cap": image_cap or shards.DEFAULT_CAP,
                "quality": shards.JPEG_QUALITY,
                "val_fraction": val_fraction,
                "seed": seed,
                "skip_bad_images": skip_bad_images,
            }
        else:
            params = {
                "resolution": resolution or DEFAULT_RESOLUTION,
                "val_fraction": val_fraction,
                "seed": seed,
                "skip_bad_images": skip_bad_images,
            }
    else:
        if shards.is_remote(cache_dir):
            raise ValueError(
                f"cache_dir {cache_dir} is object storage, which holds shard stores of image "
                f"folders only; {dataset} uses the in-memory cache: give a local cache_dir"
            )
        scan = None
        if resolution is not None:
            print(
                f"note: resolution applies to image folders; {name} is stored at its native "
                "size and resized on the device",
                flush=True,
            )
        source_hash = hashlib.sha256(
            ",".join(f"{f.filename}:{f.md5}" for f in spec.files).encode()
        ).hexdigest()
        # Native storage size: resolution does not change the output, so it is not in the key.
        params = {"val_fraction": val_fraction, "seed": seed}
    key = cache_key(dataset=name, source_hash=source_hash, **params)
    if params.get("storage") == "shards":
        return _prepare_shards(
            scan,
            cache_dir,
            name,
            key,
            params,
            workers=workers,
            max_pixels=max_image_pixels,
            t0=t0,
        )
    if shards.is_remote(cache_dir):
        raise ValueError(
            f"cache_dir {cache_dir} is object storage, which holds shard stores only; add "
            "--set storage=shards, or give a local cache_dir"
        )
    final = cache_dir / f"{name}-{key}"

    if (final / "meta.json").exists():
        info = _read_info(final)  # meta.json only: a hit touches no image or tensor data
        info.decoded_images = 0
        info.seconds = round(time.perf_counter() - t0, 3)
        print(f"cache hit: {final}", flush=True)
        return info

    decoded = 0
    skipped = 0
    if scan is not None:
        splits, classes, decoded, skipped, size = _prepare_folder(
            scan, params["resolution"], skip_bad_images, seed, workers, max_image_pixels
        )
        in_channels = 3
    else:
        root = fetch_source(spec, data_dir / "raw" / name, download=download, mirror=mirror)
        splits, classes = read_source(spec, root)
        in_channels = splits["train"].images.shape[1]
        size = splits["train"].images.shape[-1]
        decoded = sum(len(s.labels) for s in splits.values())

    test_is_val = "test" not in splits
    if "val" not in splits:
        tr, va = stratified_holdout(splits["train"].labels, val_fraction, seed)
        full = splits["train"]
        splits["val"] = RawSplit(full.images[va], full.labels[va])
        splits["train"] = RawSplit(full.images[tr], full.labels[tr])
    mean, std = channel_stats(splits["train"].images)
    counts = {k: len(splits[k].labels) for k in ("train", "val", "test") if k in splits}
    if test_is_val:
        counts["test"] = counts["val"]
    info = PreparedInfo(
        path=final,
        dataset=name,
        classes=list(classes),
        num_classes=len(classes),
        in_channels=in_channels,
        resolution=int(size),
        splits=counts,
        test_is_val=test_is_val,
        mean=mean,
        std=std,
        source_hash=source_hash,
        cache_hit=False,
        seconds=0.0,
        skipped_bad_images=skipped,
        decoded_images=decoded,
        params={"key": key, **params},
    )
    stored = [k for k in ("train", "val", "test") if k in splits]
    meta = {"format": FORMAT_VERSION, "stored_splits": stored, "info": info.to_dict()}
    _write_cache(final, {k: splits[k] for k in stored}, meta)
    info.seconds = round(time.perf_counter() - t0, 3)
    print(f"prepared {name} into {final} in {info.seconds:.1f} s", flush=True)
    return info


def _prepare_folder(
    scan: FolderScan,
    requested: int,
    skip_bad: bool,
    seed: int,
    workers: int | None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[dict[str, RawSplit], list[str], int, int, int]:
    """Decode every split of an image folder at one storage size; handle bad images."""
    size = _storage_size(scan.paths("train"), requested, seed)
    splits: dict[str, RawSplit] = {}
    all_bad: list[tuple[Path, str]] = []
    decoded = 0
    for split in scan.files:
        paths = scan.paths(split)
        images, bad = decode_images(
            paths, size, workers=workers, label=split, max_pixels=max_pixels
        )
        decoded += len(paths)
        labels = scan.labels(split)
        if bad:
            all_bad.extend(bad)
            keep = torch.ones(len(paths), dtype=torch.bool)
            index = {p: i for i, p in enumerate(paths)}
            for p, _ in bad:
                keep[index[p]] = False
            images, labels = images[keep], labels[keep]
        splits[split] = RawSplit(images, labels)
    _report_bad(all_bad, scan.root, skip_bad)
    for split, s in splits.items():
        _check_classes(split, s.labels, scan.classes)
    return splits, scan.classes, decoded, len(all_bad), size


def _report_bad(bad: list[tuple[Path | str, str]], root: Path, skip_bad: bool) -> None:
    """Fail naming every unreadable image (path and reason), unless told to skip them."""
    if bad and not skip_bad:
        listing = "\n".join(f"  {p}: {msg}" for p, msg in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        raise ValueError(
            f"{len(bad)} unreadable image(s) in {root} (fix or remove them, or pass "
            f"skip_bad_images=True (--skip-bad-images) to skip them):\n{listing}{more}"
        )
    if bad:
        log.warning("skipped %d unreadable image(s) in %s", len(bad), root)
        print(f"skipped {len(bad)} unreadable image(s)", flush=True)


def _check_classes(split: str, labels: torch.Tensor, classes: list[str]) -> None:
    present = torch.bincount(labels, minlength=len(classes))
    empty = [classes[i] for i in (present == 0).nonzero().flatten().tolist()]
    if empty:
        raise ValueError(f"split {split} has no usable images for class(es) {empty}")


def _prepare_shards(
    scan: FolderScan,
    cache_dir: Path | str,
    name: str,
    key: str,
    params: dict,
    *,
    workers: int | None,
    max_pixels: int,
    t0: float,
) -> PreparedInfo:
    """Write (or find) the shard store of an image folder; see ``shards.py`` for the format.

    Memory stays bounded whatever the folder's size: only the file list and labels are held
    (a few tens of bytes per image); pixels live in one image per worker at a time.
    """
    final = shards._join(cache_dir, f"{name}-{key}")
    if shards.store_exists(final):
        info = _read_info(final)
        info.decoded_images, info.seconds = 0, round(time.perf_counter() - t0, 3)
        print(f"cache hit: {final}", flush=True)
        return info
    remote = shards.is_remote(final)
    tmp = Path(tempfile.mkdtemp(prefix="cnnpipe-store-")) if remote else _staging_dir(Path(final))
    try:
        items = {k: [(str(scan.root / rel), lab) for rel, lab in v] for k, v in scan.files.items()}
        test_is_val = "test" not in items
        if "val" not in items:
            tr, va = stratified_holdout(
                scan.labels("train"), params["val_fraction"], params["seed"]
            )
            full = items["train"]
            items["val"] = [full[i] for i in va.tolist()]
            items["train"] = [full[i] for i in tr.tolist()]
        # Store each split in a seeded random order: a folder lists images class by class, and
        # the loader's chunk-window shuffle mixes only ~8 chunks at a time, so class-sorted
        # chunks would make class-correlated batches (webdataset shuffles shards likewise).
        g = torch.Generator().manual_seed(params["seed"])
        tables = {k: shards.PathTable([v[i] for i in torch.randperm(len(v), generator=g).tolist()])
                  for k, v in items.items()}  # fmt: skip
        del items  # the packed tables are all prepare holds per image from here on
        all_bad: list[tuple[str, str]] = []
        counts: dict[str, int] = {}
        labels: dict[str, torch.Tensor] = {}
        for split in ("train", "val", "test"):
            if split not in tables:
                continue
            table = tables[split]
            bad = shards.write_split(
                table,
                tmp / split,
                cap=params["image_cap"],
                quality=params["quality"],
                max_pixels=max_pixels,
                workers=workers,
                label=split,
            )
            all_bad.extend(bad)
            keep = np.ones(len(table), dtype=bool)
            if bad:
                bad_paths = {p for p, _ in bad}
                keep = np.array([table[i][0] not in bad_paths for i in range(len(table))])
            labels[split] = torch.from_numpy(table.labels[keep])
            counts[split] = len(labels[split])
            # Store order is input order (keep_data_ordered: one contiguous slice per worker).
            np.save(tmp / split / shards.LABELS_FILE, labels[split].numpy().astype(np.int32))
            if sum(shards.read_index(tmp / split)) != counts[split]:
                raise RuntimeError(f"shard store split {split} is incomplete; run prepare again")
        _report_bad(all_bad, scan.root, params["skip_bad_images"])
        for split, lab in labels.items():
            _check_classes(split, lab, scan.classes)
        mean, std = shards.sample_stats(tmp / "train", counts["train"], params["seed"])
        if test_is_val:
            counts["test"] = counts["val"]
        info = PreparedInfo(
            path=final if remote else Path(final),
            dataset=name,
            classes=list(scan.classes),
            num_classes=len(scan.classes),
            in_channels=3,
            resolution=params["image_cap"],
            splits=counts,
            test_is_val=test_is_val,
            mean=mean,
            std=std,
            source_hash=scan.content_hash,
            cache_hit=False,
            seconds=0.0,
            skipped_bad_images=len(all_bad),
            decoded_images=sum(len(t) for t in tables.values()),
            params={"key": key, **params},
            storage="shards",
        )
        stored = [k for k in ("train", "val", "test") if k in tables]
        meta = {
            "format": shards.STORE_FORMAT,
            "storage": "shards",
            "stored_splits": stored,
            "info": info.to_dict(),
        }
        atomic_write_json(tmp / "meta.json", meta, indent=1)
        if remote:
            shards.upload_store(tmp, final)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _publish(tmp, Path(final))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info.seconds = round(time.perf_counter() - t0, 3)
    print(f"prepared {name} into {final} (shard store) in {info.seconds:.1f} s", flush=True)
    return info
