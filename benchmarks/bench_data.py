"""Data-path benchmark (issue 3): prints one JSON object on stdout, progress on stderr.

    uv run python benchmarks/bench_data.py [--quick] [--data-dir ../shared/data]

Measures, on the real CIFAR-10 JPEG training set from the shared data folder:
1. prepare: decoding the 50,000 JPEGs into the tensor cache from scratch, then a cache hit;
2. loader: images/s of augmented, normalized training batches from our in-memory batched loader
   against the per-image baseline (torchvision ``CIFAR10`` + RandomHorizontalFlip,
   RandomCrop(32, 4), ToTensor, Normalize and a DataLoader with batch_size=8). Both read the same
   decoded pixels from memory: the baseline gets CIFAR-format pickle batches written from the
   cache, read by a ``CIFAR10`` subclass (the real pickles' md5s cannot match);
3. LeNet training steps (loader + forward/backward/Adam step) against the same per-image loop.

``--quick`` uses a 5,000-image subset and short timing windows (a smoke run, not the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import transforms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnn.data import build_loaders, load_prepared, prepare_dataset  # noqa: E402
from cnn.data.sources import CIFAR10Files  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rate(
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    step: Callable[[torch.Tensor, torch.Tensor], None],
    seconds: float,
    warmup: int = 3,
) -> float:
    """Images/s of ``step`` over batches, after ``warmup`` batches, for about ``seconds``."""
    n, t0, seen = 0, None, 0
    while True:
        for x, y in batches():
            step(x, y)
            seen += 1
            if seen == warmup:
                t0 = time.perf_counter()
                continue
            if t0 is not None:
                n += len(y)
                if time.perf_counter() - t0 >= seconds:
                    return n / (time.perf_counter() - t0)


def extract(data_dir: Path, work: Path, limit: int | None) -> Path:
    """Unpack the CIFAR-10 JPEG tarball (optionally a per-class subset) into ``work``."""
    root = work / ("cifar10-jpeg" if limit is None else f"cifar10-jpeg-{limit}")
    if (root / ".done").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    full = work / "cifar10-jpeg"
    if not (full / ".done").exists():
        with tarfile.open(data_dir / "cifar10-jpeg-train.tar.gz") as tar:
            tar.extractall(work, filter="data")
        (full / ".done").touch()
    if limit is not None:
        for cls in sorted((full / "train").iterdir()):
            dst = root / "train" / cls.name
            dst.mkdir(parents=True)
            for p in sorted(cls.iterdir())[: limit // 10]:
                shutil.copy2(p, dst / p.name)
        (root / ".done").touch()
    log(f"extracted {root} in {time.perf_counter() - t0:.1f} s")
    return root


def chapter_lenet(num_classes: int = 10) -> nn.Module:
    """The chapter's LeNet-5 layer order (conv, ReLU, pool). The registry's `lenet5` pools
    before the ReLU: the same function and parameters, fewer elementwise passes; the baseline
    keeps the chapter's order so that the engine's speed-up is measured against it."""
    from cnn.models import get_model
    from cnn.models.lenet import chapter_order

    return chapter_order(get_model("lenet5", num_classes=num_classes))


def write_cifar_batches(images: torch.Tensor, labels: torch.Tensor, root: Path) -> Path:
    """The decoded pixels as the official python-pickle batches (5 train batches)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    data = images.reshape(len(images), -1).numpy()  # CIFAR rows are CHW, like our cache
    for b, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        entry = {"data": data[part], "labels": labels[part].tolist()}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(entry))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data[:10], "labels": [0] * 10}))
    names = [f"c{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("CNNPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data-dir", type=Path, default=default_data)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "cnnpipe-bench")
    ap.add_argument("--quick", action="store_true", help="5,000 images, short timing windows")
    ap.add_argument("--batch-size", type=int, default=512, help="our loader's batch size")
    ap.add_argument("--seconds", type=float, default=None, help="timing window per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    secs = args.seconds or (2.0 if args.quick else 8.0)
    if not (args.data_dir / "cifar10-jpeg-train.tar.gz").exists():
        sys.exit(
            f"bench_data: {args.data_dir}/cifar10-jpeg-train.tar.gz not found; pass --data-dir"
        )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "quick": args.quick,
        },
    }

    # 1. prepare from scratch, then a cache hit.
    src = extract(args.data_dir, args.work_dir, 5000 if args.quick else None)
    cache = args.work_dir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    info = prepare_dataset("imagefolder", data_dir=src, cache_dir=cache)
    hit = prepare_dataset("imagefolder", data_dir=src, cache_dir=cache)
    assert hit.cache_hit
    cache_bytes = sum(p.stat().st_size for p in info.path.iterdir())
    n_images = info.splits["train"] + info.splits["val"]
    out["prepare"] = {
        "images": n_images,
        "from_scratch_s": round(info.seconds, 2),
        "images_per_s": round(n_images / info.seconds),
        "cache_hit_s": round(hit.seconds, 3),
        "cache_mb": round(cache_bytes / 2**20, 1),
        "resolution": info.resolution,
    }
    log(json.dumps(out["prepare"]))

    # 2. augmented batches: ours vs the per-image baseline, same pixels, all in memory.
    prepared = load_prepared(info.path)
    mean, std = info.mean, info.std
    x_all = torch.cat([prepared.split("train")[0], prepared.split("val")[0]])
    y_all = torch.cat([prepared.split("train")[1], prepared.split("val")[1]])
    base_root = write_cifar_batches(x_all, y_all, args.work_dir / "cifar-batches")
    tf = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomCrop(32, padding=4),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    base_ds = CIFAR10Files(str(base_root), train=True, transform=tf)
    base_dl = torch.utils.data.DataLoader(base_ds, batch_size=8, shuffle=True)
    ours = build_loaders(
        prepared,
        input_size=32,
        style="cifar",
        batch_size=args.batch_size,
        mode="memory",
        device="cpu",
    )

    epoch = [0]

    def our_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ours.train.set_epoch(epoch[0])
        epoch[0] += 1
        return iter(ours.train)

    def noop(x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    log("timing augmented batches ...")
    base_ips = rate(lambda: iter(base_dl), noop, secs)
    our_ips = rate(our_batches, noop, secs)
    out["loader"] = {
        "ours_images_per_s": round(our_ips),
        "baseline_images_per_s": round(base_ips),
        "speedup": round(our_ips / base_ips, 1),
        "target_speedup": 20,
        "ours_batch_size": args.batch_size,
        "baseline_batch_size": 8,
    }
    log(json.dumps(out["loader"]))

    # 3. LeNet training steps: loader + forward/backward/Adam step.
    from cnn.models import get_model

    def trainer(channels_last: bool = False) -> Callable[[torch.Tensor, torch.Tensor], None]:
        torch.manual_seed(0)
        model = get_model("lenet5", num_classes=10)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x.contiguous(memory_format=fmt)), y).backward()
            opt.step()

        return step

    log("timing LeNet training steps ...")
    base_train = rate(lambda: iter(base_dl), trainer(), secs)
    our_train = rate(our_batches, trainer(), secs)
    our_train_cl = rate(our_batches, trainer(channels_last=True), secs)
    out["lenet_train"] = {
        "ours_images_per_s": round(our_train),
        "ours_channels_last_images_per_s": round(our_train_cl),
        "baseline_images_per_s": round(base_train),
        "speedup": round(our_train / base_train, 1),
        "speedup_channels_last": round(our_train_cl / base_train, 1),
        "target_speedup": 10,
        "optimizer": "Adam",
        "ours_batch_size": args.batch_size,
    }
    log(json.dumps(out["lenet_train"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
