"""Loaders for the training job: in-memory batched (on the device) or streaming (DataLoader).

Both paths share one sharding plan (docs/internals.md):
- train: one permutation per epoch from ``(seed, epoch)``; global batch ``i`` is
  ``perm[i*B:(i+1)*B]`` and rank ``r`` takes its contiguous ``B / world_size`` slice; the last
  incomplete global batch is dropped;
- augmentation randomness for batch ``i`` comes from a generator seeded by
  ``(seed, epoch, i, rank)``, so ``iterate(start_batch=k)`` resumes exactly;
- eval: contiguous shards with no padding, every sample seen by exactly one rank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import STYLES, BatchAugment, random_resized_crop_boxes
from .prepare import Prepared, PreparedInfo, load_prepared, memory_budget_bytes
from .resolve import eval_resize_size
from .shards import StoreSplit, chunk_window_permutation, open_store

if TYPE_CHECKING:
    from torchvision.transforms import v2

MODES = ("auto", "memory", "stream")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and machines)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class ShardPlan:
    """Which sample indices rank ``rank`` gets in each batch, and each batch's seed."""

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        world_size: int,
        rank: int,
        train: bool,
        seed: int,
        permutation: Callable[[torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        self.n, self.b, self.world, self.rank = n, batch_size, world_size, rank
        self.train, self.seed = train, seed
        # The epoch's sample order; default a full random permutation. Shard stores pass
        # shards.chunk_window_permutation (a permutation too, so every guarantee holds).
        self.permutation = permutation or (lambda g: torch.randperm(n, generator=g))
        self.epoch = 0
        if train:
            self.num_batches = n // (batch_size * world_size)
        else:
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
            self.lo, self.hi = lo, hi
            self.num_batches = -(-(hi - lo) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batch_seed(self, i: int) -> int:
        return mix_seed(self.seed, self.epoch, i, self.rank)

    def batches(self, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} out of range 0..{self.num_batches}")
        if self.train:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            perm = self.permutation(g)
            gb = self.b * self.world
            for i in range(start_batch, self.num_batches):
                lo = i * gb + self.rank * self.b
                yield i, perm[lo : lo + self.b]
        else:
            for i in range(start_batch, self.num_batches):
                lo = self.lo + i * self.b
                yield i, torch.arange(lo, min(lo + self.b, self.hi))

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return self.num_batches * self.b if self.train else self.hi - self.lo


class _LoaderBase:
    """Common surface: ``set_epoch``, ``iterate(start_batch)``, ``__iter__``, ``__len__``."""

    plan: ShardPlan
    # Called with (batch number, sample indices) as each training batch is yielded; the engine
    # installs it only under a test hook that counts samples across a kill and resume.
    trace: Callable[[int, torch.Tensor], None] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.plan.set_epoch(epoch)

    def __len__(self) -> int:
        return self.plan.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def dataset_size(self) -> int:
        return self.plan.n


class MemoryLoader(_LoaderBase):
    """The whole split as one uint8 tensor on ``device``; each batch is one gather + augment."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        plan: ShardPlan,
        augment: BatchAugment,
        device: torch.device,
    ) -> None:
        self.images, self.labels = images, labels
        self.plan, self.augment, self.device = plan, augment, device

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, idx in self.plan.batches(start_batch):
            if self.trace is not None:
                self.trace(i, idx)
            idx = idx.to(self.images.device, non_blocking=True)
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            g = torch.Generator().manual_seed(self.plan.batch_seed(i)) if self.plan.train else None
            yield self.augment(x, g), y


def _v2_transform(aug: BatchAugment) -> v2.Transform:
    """The torchvision.transforms.v2 pipeline with the same semantics as ``aug``."""
    from torchvision.transforms import v2

    size = aug.input_size
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)]
    if not aug.train or aug.style == "none":
        head = [v2.Resize(aug.resize_size, antialias=True), v2.CenterCrop(size)]
    elif aug.style in ("cifar", "flip"):
        padding = aug.padding if aug.style == "cifar" else 0
        head = [
            v2.Resize(size, antialias=True),
            v2.RandomCrop(size, padding=padding),
            v2.RandomHorizontalFlip(),
        ]
    else:
        head = [
            v2.RandomResizedCrop(size, scale=aug.scale, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    return v2.Compose(head + tail)


class _SeededBatchDataset(Dataset):
    """Map-style dataset whose ``__getitems__`` receives a whole batch plus the batch's seed.

    Seeding per batch (not per worker) makes the stream path reproducible for any number of
    workers and lets ``iterate(start_batch=k)`` resume exactly.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, batch: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        seed, idx = batch[0]
        with torch.random.fork_rng(devices=[]):  # never disturb the trainer's global RNG
            torch.manual_seed(seed)
            xs = [self.transform(tv_tensors.Image(self.images[i])) for i in idx]
        return torch.stack([x.as_subclass(torch.Tensor) for x in xs]), self.labels[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([(0, torch.tensor([i]))])


class _PlanSampler:
    """batch_sampler for DataLoader: yields ``[(batch_seed, indices)]`` from a ShardPlan."""

    def __init__(self, plan: ShardPlan) -> None:
        self.plan, self.start = plan, 0

    def __iter__(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        for i, idx in self.plan.batches(self.start):
            yield [(self.plan.batch_seed(i), idx)]

    def __len__(self) -> int:
        return self.plan.num_batches - self.start


def _collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def _plan_loader(
    dataset: Dataset, plan: ShardPlan, start_batch: int, num_workers: int, *, pin: bool
) -> DataLoader:
    """A DataLoader whose batches are the plan's, from ``start_batch`` (one item per batch)."""
    sampler = _PlanSampler(plan)
    sampler.start = start_batch
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=4 if num_workers else None,
    )


class StreamLoader(_LoaderBase):
    """``torch.utils.data.DataLoader`` with workers and ``transforms.v2``, same sharding."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        plan: ShardPlan,
        augment: BatchAugment,
        device: torch.device,
        num_workers: int,
    ) -> None:
        self.plan, self.device, self.num_workers = plan, device, num_workers
        self.dataset = _SeededBatchDataset(images, labels, _v2_transform(augment))

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = _plan_loader(self.dataset, self.plan, start_batch, self.num_workers,
                              pin=self.device.type == "cuda")  # fmt: skip
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


DECODERS = ("pil", "torchvision", "device")


def _rrc_flip_params(
    h: int, w: int, aug: BatchAugment, g: torch.Generator
) -> tuple[tuple[int, int, int, int], bool]:
    """One RandomResizedCrop box (x1, y1, x2, y2) on an (h, w) image and a flip decision."""
    box = random_resized_crop_boxes(1, h, w, g, scale=aug.scale)[0].tolist()
    return tuple(int(v) for v in box), bool(torch.rand(1, generator=g) < 0.5)


def _center_box(h: int, w: int, aug: BatchAugment) -> tuple[int, int, int, int]:
    """The eval crop (resize shorter side to resize_size, center crop input_size) as a box on
    the (h, w) image, for the DCT-scaled PIL decoder."""
    side = min(h, w) * aug.input_size / aug.resize_size
    x1, y1 = (w - side) / 2, (h - side) / 2
    return round(x1), round(y1), round(x1 + side), round(y1 + side)


def decode_crop_pil(
    data: bytes,
    box: tuple[int, int, int, int] | None,
    size: int,
    flip: bool,
    aug: BatchAugment | None = None,
) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, size, size) of ``box``, decoding at a reduced DCT scale.

    libjpeg-turbo (through Pillow's ``draft``) can decode straight to 1/2, 1/4 or 1/8 size;
    when the crop box is at least twice the output size that skips most of the decode work,
    which dominates the cost of RandomResizedCrop on photos. ``box=None`` is the eval crop.
    """
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if box is None:
            box = _center_box(h, w, aug)
        bw, bh = box[2] - box[0], box[3] - box[1]
        img.draft("RGB", (max(1, w * size // max(bw, 1)), max(1, h * size // max(bh, 1))))
        sx, sy = img.size[0] / w, img.size[1] / h
        img = img.convert("RGB")
        out = img.resize(
            (size, size),
            Image.BILINEAR,
            box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy),
            reducing_gap=None,
        )
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


def decode_crop_tensor(
    x: torch.Tensor, box: tuple[int, int, int, int] | None, size: int, flip: bool, aug: BatchAugment
) -> torch.Tensor:
    """Decoded uint8 CHW (any device) -> uint8 (3, size, size): the box, or the eval transform.

    The eval transform is the exported model's own (``TF.resize`` of the shorter side, then
    ``TF.center_crop``), so evaluation and serving see the same pixels.
    """
    import torchvision.transforms.v2.functional as TF

    if box is None:
        x = TF.resize(x, [aug.resize_size], antialias=True)
        return TF.center_crop(x, [size, size])
    x1, y1, x2, y2 = box
    x = TF.resized_crop(x, y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True)
    return x.flip(-1) if flip else x


class _StoreBatchDataset(Dataset):
    """Shard-store batches: ``__getitems__([(seed, indices)])`` -> uint8 batch, labels.

    Runs in DataLoader workers: reads each sample's JPEG from the store and decodes it on the
    CPU (``pil``: DCT-scaled, ``torchvision``: ``decode_jpeg``), or hands the bytes and crop
    boxes back for batched decoding on the device (``device``: nvJPEG on CUDA). Crop boxes and
    flips come from the batch's seed, so batches are reproducible and resumable.
    """

    def __init__(self, split: StoreSplit, aug: BatchAugment, crop: bool, decoder: str) -> None:
        self.split, self.aug, self.crop, self.decoder = split, aug, crop, decoder

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, batch: Sequence) -> tuple[Any, ...]:
        seed, idx = batch[0]
        g = torch.Generator().manual_seed(seed)
        size, boxes, flips = self.aug.input_size, [], []
        # Read in store order (LitData re-opens a chunk's Arrow table on every chunk switch:
        # sorted, a batch switches at most once per chunk), then restore the batch's order.
        wanted = idx.tolist()
        got = {i: self.split[i] for i in sorted(set(wanted))}
        datas = [got[i][0] for i in wanted]
        labels = [got[i][1] for i in wanted]
        for data in datas:
            if self.crop:
                h, w = _jpeg_size(data)
                box, flip = _rrc_flip_params(h, w, self.aug, g)
            else:
                box, flip = None, False
            boxes.append(box)
            flips.append(flip)
        y = torch.tensor(labels, dtype=torch.int64)
        if self.decoder == "device":
            raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
            return raw, boxes, flips, y
        if self.decoder == "pil":
            xs = [
                decode_crop_pil(d, b, size, f, self.aug)
                for d, b, f in zip(datas, boxes, flips, strict=True)
            ]
        else:
            xs = [
                decode_crop_tensor(_decode_jpeg(d), b, size, f, self.aug)
                for d, b, f in zip(datas, boxes, flips, strict=True)
            ]
        return torch.stack(xs), y


def _decode_jpeg(data: bytes, device: str = "cpu") -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(t, mode=ImageReadMode.RGB, device=device)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG header without decoding it."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size[1], img.size[0]


class StoreLoader(_LoaderBase):
    """A shard-store split through a DataLoader with workers; same sharding as the others.

    Workers return uint8 batches (4x less inter-process traffic than float); the cast, the
    normalisation and, for the ``cifar``/``flip`` styles, the crop/flip run on the batch on the
    device afterwards.
    """

    def __init__(
        self,
        split: StoreSplit,
        plan: ShardPlan,
        aug: BatchAugment,
        device: torch.device,
        num_workers: int,
        decoder: str,
    ) -> None:
        self.plan, self.aug, self.device, self.num_workers = plan, aug, device, num_workers
        self.decoder = decoder
        rrc = aug.train and aug.style == "finetune"
        self.batch_aug = aug.train and aug.style in ("cifar", "flip")
        eval_like = BatchAugment(
            style="none",
            train=False,
            input_size=aug.input_size,
            resize_size=aug.resize_size if not self.batch_aug else aug.input_size,
            mean=aug.mean,
            std=aug.std,
        )
        self.dataset = _StoreBatchDataset(split, aug if rrc else eval_like, rrc, decoder)

    def iterate(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin = self.device.type == "cuda" and self.decoder != "device"
        loader = _plan_loader(self.dataset, self.plan, start_batch, self.num_workers, pin=pin)
        batches = self.plan.batches(start_batch)
        for out in loader:
            i, idx = next(batches)
            if self.trace is not None:
                self.trace(i, idx)
            if self.decoder == "device":
                x = self._decode_on_device(*out[:3])
            else:
                x = out[0].to(self.device, non_blocking=True)
            y = out[-1].to(self.device, non_blocking=True)
            if self.batch_aug:
                g = torch.Generator().manual_seed(self.plan.batch_seed(i))
                yield self.aug(x, g), y
            else:
                yield self.aug.normalize(x), y

    def _decode_on_device(self, raw: list[torch.Tensor], boxes: list, flips: list) -> torch.Tensor:
        """Batched ``decode_jpeg`` on the device (nvJPEG on CUDA), then crops there too."""
        from torchvision.io import ImageReadMode, decode_jpeg

        dev = self.device if self.device.type == "cuda" else "cpu"
        imgs = decode_jpeg(raw, mode=ImageReadMode.RGB, device=dev)
        aug = self.dataset.aug
        size = aug.input_size
        return torch.stack(
            [
                decode_crop_tensor(x, b, size, f, aug)
                for x, b, f in zip(imgs, boxes, flips, strict=True)
            ]
        ).to(self.device)


def _is_store(path: str | Path) -> bool:
    from .shards import is_remote

    if is_remote(path):
        return True
    p = Path(path)
    p = p.parent if p.name == "meta.json" else p
    try:
        return json.loads((p / "meta.json").read_text()).get("storage") == "shards"
    except (OSError, ValueError):
        return False


@dataclass
class Loaders:
    """What ``build_loaders`` returns."""

    train: _LoaderBase
    val: _LoaderBase
    test: _LoaderBase
    classes: list[str]
    num_classes: int
    in_channels: int
    mode: str  # "memory" or "stream"
    info: PreparedInfo


def build_loaders(
    prepared: Prepared | PreparedInfo | str | Path,
    *,
    input_size: int,
    style: str,
    batch_size: int,
    eval_batch_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    mode: str = "auto",
    num_workers: int = 2,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    resize_size: int | None = None,
    memory_budget: int | None = None,
    decoder: str = "torchvision",
    stream_cache_dir: str | None = None,
) -> Loaders:
    """Train/val/test loaders over a prepared cache (or shard store) for one rank.

    A shard store (``PreparedInfo.storage == "shards"``) always streams: JPEGs are decoded in
    ``num_workers`` worker processes by ``decoder`` (``pil``, ``torchvision``, or ``device``
    for batched decoding on the training device), ``stream_cache_dir`` holds chunks of a
    remote (``s3://``) store.

    ``batch_size`` and ``eval_batch_size`` are global; each rank gets ``// world_size``.
    ``style`` is ``cifar``, ``finetune`` or ``none`` (no training augmentation: the eval
    transform). ``resize_size`` (eval: shorter side before the center crop) defaults to
    ``input_size`` for ``cifar`` and ``none``, ``round(input_size / 0.875)`` (224 -> 256) for
    ``finetune``.
    ``mode="auto"`` picks memory when the uint8 splits fit ``memory_budget`` bytes (default:
    half the free GPU memory or RAM; env ``CNNPIPE_MEMORY_BUDGET_MB``), else stream.
    """
    device = torch.device(device)
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}"
        )
    eval_batch_size = eval_batch_size or batch_size
    for name, b in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if not isinstance(b, int) or b < world_size or b % world_size:
            raise ValueError(
                f"{name} ({b}) must be a positive multiple of world_size ({world_size}): it is "
                "the global batch, split evenly across ranks"
            )
    if resize_size is None:
        resize_size = eval_resize_size(style, input_size)
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    store = None
    if isinstance(prepared, PreparedInfo):
        if prepared.storage == "shards":
            store = open_store(prepared.path, cache_dir=stream_cache_dir)
        prepared = prepared.path
    elif isinstance(prepared, (str, Path)) and _is_store(prepared):
        store = open_store(prepared, cache_dir=stream_cache_dir)
    if store is not None:
        from .prepare import _read_info

        info = _read_info(store.path, store.meta)
        n_train = len(store.splits["train"])
        mode = "stream"
    else:
        if not isinstance(prepared, Prepared):
            prepared = load_prepared(prepared)
        info = prepared.info
        n_train = len(prepared.split("train")[1])
    b = batch_size // world_size
    if n_train < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the training split ({n_train} images) "
            "of " + str(info.path) + "; use a smaller batch"
        )
    mean, std = normalize if normalize is not None else (info.mean, info.std)
    if len(mean) != info.in_channels or len(std) != info.in_channels:
        if len(mean) == 3 and info.in_channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        else:
            raise ValueError(
                f"normalize has {len(mean)} channel(s) but the dataset has {info.in_channels}"
            )
    kw = dict(style=style, input_size=input_size, resize_size=resize_size, mean=mean, std=std)
    aug_train = BatchAugment(train=True, **kw)
    aug_eval = BatchAugment(train=False, **kw)

    if mode == "auto":
        unique = {id(t): t for name in prepared.splits for t in prepared.splits[name]}
        nbytes = sum(t.numel() * t.element_size() for t in unique.values())
        budget = memory_budget if memory_budget is not None else memory_budget_bytes(device)
        mode = "memory" if nbytes <= budget else "stream"

    eb = eval_batch_size // world_size
    moved: dict[int, torch.Tensor] = {}

    def on_device(t: torch.Tensor) -> torch.Tensor:
        # On CPU keep the memory-mapped tensor: ranks on one host share its page cache instead
        # of each holding a private copy. test shares val's tensor when test_is_val.
        if device.type == "cpu":
            return t
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    def make(split: str, train: bool) -> _LoaderBase:
        aug = aug_train if train else aug_eval
        plan_kw = dict(
            batch_size=b if train else eb, world_size=world_size, rank=rank, train=train, seed=seed
        )
        if store is not None:
            part = store.splits[split]
            perm = lambda g: chunk_window_permutation(part.chunk_sizes, g)  # noqa: E731
            plan = ShardPlan(len(part), permutation=perm, **plan_kw)
            return StoreLoader(part, plan, aug, device, num_workers, decoder)
        x, y = prepared.split(split)
        plan = ShardPlan(len(y), **plan_kw)
        if mode == "memory":
            return MemoryLoader(on_device(x), on_device(y), plan, aug, device)
        return StreamLoader(x, y, plan, aug, device, num_workers)

    return Loaders(
        train=make("train", True),
        val=make("val", False),
        test=make("test", False),
        classes=list(info.classes),
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        mode=mode,
        info=info,
    )
