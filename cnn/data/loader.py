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
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .augment import STYLES, BatchAugment
from .prepare import Prepared, PreparedInfo, load_prepared

MODES = ("auto", "memory", "stream")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and machines)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class ShardPlan:
    """Which sample indices rank ``rank`` gets in each batch, and each batch's seed."""

    def __init__(
        self, n: int, *, batch_size: int, world_size: int, rank: int, train: bool, seed: int
    ) -> None:
        self.n, self.b, self.world, self.rank = n, batch_size, world_size, rank
        self.train, self.seed = train, seed
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
            perm = torch.randperm(self.n, generator=g)
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
            idx = idx.to(self.images.device, non_blocking=True)
            x = self.images.index_select(0, idx)
            y = self.labels.index_select(0, idx)
            g = torch.Generator().manual_seed(self.plan.batch_seed(i)) if self.plan.train else None
            yield self.augment(x, g), y


def _v2_transform(aug: BatchAugment) -> v2.Transform:
    """The torchvision.transforms.v2 pipeline with the same semantics as ``aug``."""
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
        sampler = _PlanSampler(self.plan)
        sampler.start = start_batch
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers else None,
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


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


def memory_budget_bytes(device: torch.device) -> int:
    """Default budget for the in-memory path: half the free GPU memory, or half the free RAM."""
    env = os.environ.get("CNNPIPE_MEMORY_BUDGET_MB")
    if env:
        return int(float(env) * 2**20)
    if device.type == "cuda":
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
) -> Loaders:
    """Train/val/test loaders over a prepared cache for one rank.

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
        resize_size = input_size if style != "finetune" else round(input_size / 0.875)
    if isinstance(prepared, PreparedInfo):
        prepared = prepared.path
    if not isinstance(prepared, Prepared):
        prepared = load_prepared(prepared)
    info = prepared.info
    train_x, train_y = prepared.split("train")
    b = batch_size // world_size
    if len(train_y) < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the training split ({len(train_y)} images) "
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

    unique = {id(t): t for name in prepared.splits for t in prepared.splits[name]}
    nbytes = sum(t.numel() * t.element_size() for t in unique.values())
    if mode == "auto":
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
        x, y = prepared.split(split)
        plan = ShardPlan(
            len(y),
            batch_size=b if train else eb,
            world_size=world_size,
            rank=rank,
            train=train,
            seed=seed,
        )
        aug = aug_train if train else aug_eval
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
