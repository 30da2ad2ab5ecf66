"""CPU training benchmark for LeNet-5 on CIFAR-10 (issue 4's figures); prints one JSON object.

    uv run python benchmarks/bench_train.py [--quick] [--rounds N] [--data-dir DIR] [--workdir DIR]

Figures, on the CIFAR-10 training JPEGs (../shared/data/cifar10-jpeg-train.tar.gz) with 10% of
them held out for validation:
- `time_to_target`: the `lenet5-cifar10` recipe under `torchrun --nproc-per-node 2` (1 thread
  per rank) with seeds 0, 1 and 2; per seed, the epoch at which validation accuracy first
  reached 68.5%, the training seconds until then (`train_seconds_to_target`: optimizer steps
  only, the figure held against the 45-s target), the seconds from the start of `cnn.train`
  (data load, model build and every evaluation included) and the final validation accuracy;
  `wall_s` adds the torchrun/interpreter start-up.
- `throughput`: training images/s of the engine (one epoch of the recipe) with 1 rank x 1
  thread, 2 ranks x 1 thread and 1 rank x 2 threads, against the chapter's loop (batch 8, Adam,
  per-image transforms, measured here in the same process for a fair ratio, in segments before,
  between and after the engine runs: each run is held against the segments on either side of
  it), and the DDP scaling efficiency = images/s(2 ranks x 1 thread) / (2 x images/s(1 rank x
  1 thread)). `--rounds N` repeats the engine runs and reports medians.

Every training run goes through the engine's public entry point (`torchrun -m cnn.train
--config run.yaml`) and its `result.json`, so the benchmark measures exactly what users run.
The machine's load average is reported: on a shared machine the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `cnn` is importable

# Shared with the data-path benchmark (same extraction folder, same chapter baseline).
from bench_data import chapter_lenet, extract, log, rate, write_cifar_batches  # noqa: E402

SHARED_DATA = Path(os.environ.get("CNNPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
ARCHIVE = "cifar10-jpeg-train.tar.gz"
CHAPTER_BATCH = 8
# Issue 9: a margin over the chapter's 67% test figure, within 45 s of training, every seed.
TARGET = 0.685
TARGET_TRAIN_S = 45.0
SEEDS = "0,1,2"
# Not bench_data.py's "cache" folder, which that script deletes when it starts.
CACHE = "train-cache"


class ChapterLoop:
    """The chapter's training loop, built once and measured in segments: torchvision
    ``CIFAR10`` with per-image RandomHorizontalFlip, RandomCrop(32, 4), ToTensor, Normalize, a
    DataLoader at batch 8, and the chapter's LeNet-5 (conv, ReLU, pool) with Adam (lr 1e-3).
    The same baseline as bench_data.py (shared helpers), on the same decoded pixels.

    Measured between the engine runs, not once before them: this VM's speed drifts by up to 2x
    within minutes, so each engine run is compared with the segments just before and after it."""

    def __init__(self, work: Path, prepared_path: Path) -> None:
        import torch
        from torch import nn
        from torchvision import transforms

        from cnn.data import load_prepared
        from cnn.data.sources import CIFAR10Files

        prepared = load_prepared(prepared_path)
        images, labels = prepared.split("train")
        info = prepared.info
        root = write_cifar_batches(images, labels, work / "cifar-batches-train")
        tf = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(),
                transforms.RandomCrop(32, padding=4),
                transforms.ToTensor(),
                transforms.Normalize(info.mean, info.std),
            ]
        )
        dataset = CIFAR10Files(str(root), train=True, transform=tf)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=CHAPTER_BATCH, shuffle=True)
        torch.manual_seed(0)
        model = chapter_lenet(info.num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        criterion = nn.CrossEntropyLoss()

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()

        self.step = step

    def measure(self, seconds: float) -> float:
        """Images/s over about `seconds`, with one thread, like each rank of the engine runs
        compared with it: a batch of 8 gains nothing from a second thread, and on a shared
        machine a spinning second thread only adds noise."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return rate(lambda: iter(self.loader), self.step, seconds)
        finally:
            torch.set_num_threads(threads)


def run_engine(
    name: str, workdir: Path, data_dir: Path, nproc: int, threads: int, overrides: list[str]
) -> dict[str, Any]:
    """One engine run under torchrun; returns its result.json plus the command's wall time."""
    from cnn.config import resolve_config

    out = workdir / "runs" / name
    cfg = resolve_config(
        model="lenet5",
        dataset="imagefolder",
        recipe="lenet5-cifar10",
        overrides=[
            f"data_dir={data_dir}",
            f"cache_dir={workdir / CACHE}",
            f"output_dir={out}",
            f"num_threads={threads}",
            "device=cpu",
            *overrides,
        ],
        nproc_per_node=nproc,
    )
    # A fresh directory: a leftover checkpoint with the same config hash would be resumed.
    if out.exists():
        import shutil

        shutil.rmtree(out)
    run_yaml = cfg.to_yaml(workdir / f"{name}.yaml")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cnn.train",
        "--config",
        str(run_yaml),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    log(f"{name}: {nproc} rank(s) x {threads} thread(s), {cfg.optim.epochs} epoch(s)")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"{name}: torchrun failed with exit code {proc.returncode}:\n{tail}")
    for line in proc.stdout.splitlines():
        if line.startswith("epoch ") or line.startswith("target_accuracy"):
            log(f"  {line}")
    result = json.loads((out / "result.json").read_text())
    result["wall_s"] = wall
    return result


def time_to_target(result: dict[str, Any], target: float) -> dict[str, Any]:
    history = result["history"]
    hit = next((row for row in history if row["val_accuracy"] >= target), None)
    return {
        "target_val_accuracy": target,
        "reached": hit is not None,
        "epoch": hit["epoch"] if hit else None,
        "seconds": round(hit["elapsed_s"], 2) if hit else None,
        "train_seconds_to_target": (
            round(hit["train_seconds"], 2) if hit and "train_seconds" in hit else None
        ),
        "epochs_run": result["epochs_completed"],
        "final_val_accuracy": history[-1]["val_accuracy"],
        "best_val_accuracy": result["best_val_accuracy"],
        "train_seconds": round(result["train_seconds"], 2),
        "wall_s": round(result["wall_s"], 2),
        "images_per_s": round(result["images_per_s"]),
        "per_epoch": [
            {"epoch": r["epoch"], "val_accuracy": r["val_accuracy"], "elapsed_s": r["elapsed_s"]}
            for r in history
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Print the JSON report on stdout; everything else (including cnn.data's progress lines,
    which go to stdout) is sent to stderr so the output parses as JSON."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        report = _run(argv)
    print(json.dumps(report, indent=2), file=out)
    return 0


def _run(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stop at the target; short baseline")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=SHARED_DATA,
        help=f"folder holding {ARCHIVE} (default: ../shared/data or $CNNPIPE_SHARED_DATA)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cnnpipe-bench",
        help="scratch folder (extracted JPEGs, tensor cache, runs); shared with bench_data.py",
    )
    parser.add_argument("--target", type=float, default=TARGET)
    parser.add_argument("--seeds", default=SEEDS, help="comma-separated seeds for time-to-target")
    parser.add_argument("--skip-time-to-target", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="throughput: repeat the three engine runs this many times (medians reported)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} must be at least 1")
    if not 0 < args.target <= 1:
        parser.error(f"--target {args.target} must be a fraction in (0, 1], e.g. 0.67")

    if not (args.data_dir / ARCHIVE).is_file():
        parser.error(
            f"{args.data_dir / ARCHIVE} not found; pass --data-dir (the folder holding {ARCHIVE})"
            " or set CNNPIPE_SHARED_DATA"
        )
    from cnn.data import prepare_dataset

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = extract(args.data_dir, workdir, None)
    t0 = time.perf_counter()
    info = prepare_dataset(
        "imagefolder", data_dir=data_dir, cache_dir=workdir / CACHE, val_fraction=0.1, seed=0
    )
    log(f"prepared {info.splits} in {time.perf_counter() - t0:.1f} s (cache_hit={info.cache_hit})")
    cores = os.cpu_count() or 1
    report: dict[str, Any] = {
        "benchmark": "lenet5-cifar10 on CPU",
        "recipe": "lenet5-cifar10",
        "data": {"dir": str(data_dir), "splits": info.splits, "test_is_val": info.test_is_val},
        "cpu_cores": cores,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
    }

    if not args.skip_throughput:
        chapter = ChapterLoop(workdir, info.path)
        seconds = 5.0 if args.quick else 10.0
        runs = {
            "1rank_x_1thread": (1, 1),
            "2ranks_x_1thread": (2, 1),
            "1rank_x_2threads": (1, 2),
        }
        segments: list[float] = []
        tput: dict[str, list[float]] = {name: [] for name in runs}
        ratio: dict[str, list[float]] = {name: [] for name in runs}

        def chapter_segment() -> None:
            log("chapter loop (batch 8, Adam, per-image transforms, 1 process x 1 thread)")
            segments.append(chapter.measure(seconds))
            log(f"  {segments[-1]:.0f} images/s")

        chapter_segment()
        for _ in range(args.rounds):
            for name, (nproc, threads) in runs.items():
                result = run_engine(f"tput-{name}", workdir, data_dir, nproc, threads, ["epochs=1"])
                tput[name].append(result["images_per_s"])
                log(f"  {tput[name][-1]:.0f} images/s")
                chapter_segment()
                ratio[name].append(tput[name][-1] / statistics.mean(segments[-2:]))
        med = {name: statistics.median(v) for name, v in tput.items()}
        speedup = {name: statistics.median(v) for name, v in ratio.items()}
        efficiency = [
            two / (2 * one)
            for one, two in zip(tput["1rank_x_1thread"], tput["2ranks_x_1thread"], strict=True)
        ]
        report["throughput"] = {
            "rounds": args.rounds,
            "chapter_loop_images_per_s": round(statistics.mean(segments)),
            "chapter_loop_segments_images_per_s": [round(v) for v in segments],
            **{f"{k}_images_per_s": round(v) for k, v in med.items()},
            **{f"{k}_images_per_s_each": [round(x) for x in v] for k, v in tput.items()},
            "speedup_vs_chapter_1rank": round(speedup["1rank_x_1thread"], 2),
            "speedup_vs_chapter_2ranks": round(speedup["2ranks_x_1thread"], 2),
            "speedup_vs_chapter_2threads": round(speedup["1rank_x_2threads"], 2),
            "speedup_vs_chapter_best": round(max(speedup.values()), 2),
            "ddp_scaling_efficiency": round(statistics.median(efficiency), 3),
            "ddp_scaling_efficiency_each": [round(e, 3) for e in efficiency],
            "how": "each engine run's speed-up is against the mean of the chapter-loop segments "
            "measured just before and after it; with --rounds N, medians over the rounds",
            "targets": {"speedup": 10.0, "ddp_scaling_efficiency": 0.85},
        }

    if not args.skip_time_to_target:
        over = [f"target_accuracy={args.target}"] if args.quick else []
        per_seed: dict[str, Any] = {}
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            result = run_engine(
                f"time-to-target-seed{seed}", workdir, data_dir, 2, 1, [*over, f"seed={seed}"]
            )
            per_seed[str(seed)] = time_to_target(result, args.target)
        secs = [r["train_seconds_to_target"] for r in per_seed.values()]
        report["time_to_target"] = {
            "target_val_accuracy": args.target,
            "target_train_s": TARGET_TRAIN_S,
            "all_seeds_within_target": all(s is not None and s <= TARGET_TRAIN_S for s in secs),
            "seeds": per_seed,
        }

    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return report


if __name__ == "__main__":
    sys.exit(main())
