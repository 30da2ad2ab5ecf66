"""Data-at-scale benchmark (issue 11): prints one JSON object on stdout, progress on stderr.

    uv run python benchmarks/make_photos.py BIG --images 200000 --classes 1000
    uv run python benchmarks/make_photos.py MEDIUM --classes 100 --link-from BIG
    uv run --group bench python benchmarks/bench_store.py --medium MEDIUM --big BIG --work W

Steps (each can be skipped; ``--quick`` runs all of them at toy size on a generated folder):
1. ``prepare``: ``cnnpipe prepare --set storage=shards`` in a child process on MEDIUM and BIG:
   images/s and the peak memory (summed PSS) of the whole process tree, sampled every 0.5 s,
   and the store's size on disk against the source folder.
2. ``libraries``: the same encoded JPEGs written by LitData ``optimize`` and by MosaicML
   ``streaming``'s ``MDSWriter`` (one writer per core, then ``merge_index``), and read back in
   a chunk-window order: write images/s, size, read samples/s.
3. ``stream``: training batches (224 px, batch 256, 2 workers, RandomResizedCrop + flip +
   normalise) from the store with each decoder, against torchvision ``ImageFolder`` +
   ``DataLoader`` with the equivalent ``transforms.v2`` pipeline on the original files.
4. ``caps``: decode + crop images/s of the stream at several shorter-side caps.
5. ``pass``: one whole pass over the BIG store's training split; images/s and peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PeakRSS:
    """Peak memory of a process and all its descendants, sampled in a thread.

    Summed PSS (proportional set size), not RSS: forked workers share the parent's pages
    (torch's libraries alone are ~400 MB), which a sum of RSS would count once per process.
    """

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.proc, self.every, self.peak = psutil.Process(pid), every, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_full_info().pss
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return round(self.peak / 2**30, 3)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def count_images(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def run_child(code: str | list[str]) -> tuple[float, float, str]:
    """Run python code (or a command) in a child; return (seconds, peak PSS GiB of its tree,
    last line of its stdout)."""
    cmd = [sys.executable, "-c", code] if isinstance(code, str) else code
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=None, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    peak = PeakRSS(p.pid)
    out, _ = p.communicate()
    rss = peak.done()
    if p.returncode:
        raise SystemExit(f"child failed ({p.returncode}): {cmd}")
    return time.perf_counter() - t0, rss, out.strip().splitlines()[-1] if out.strip() else ""


def bench_prepare(folder: Path, cache: Path, cap: int) -> dict:
    n = count_images(folder)
    log(f"prepare {folder} ({n} images) ...")
    # The real command line, as a user runs it (its --json object is the last stdout line).
    cmd = [sys.executable, "-m", "flows.cli", "prepare", "--dataset", "imagefolder",
           "--data-dir", str(folder), "--cache-dir", str(cache), "--set", "storage=shards",
           "--set", f"image_cap={cap}", "--json"]  # fmt: skip
    secs, rss, out = run_child(cmd)
    info = json.loads(out)
    store, source = du(Path(info["path"])), du(folder)
    res = {
        "images": n,
        "seconds": round(secs, 1),
        "images_per_s": round(n / secs, 1),
        "peak_rss_gib": rss,
        "store_gib": round(store / 2**30, 3),
        "source_gib": round(source / 2**30, 3),
        "store_over_source": round(store / source, 3),
        "path": info["path"],
    }
    log(f"  {res}")
    return res


def bench_libraries(folder: Path, work: Path, cap: int, limit: int) -> dict:
    """LitData vs MosaicML streaming on the same encoded bytes (first ``limit`` images)."""

    from cnn.data import shards
    from cnn.data.images import encode_capped

    files = sorted(p for p in (folder / "train").rglob("*.jpg"))[:limit]
    items = [(str(p), i % 100) for i, p in enumerate(files)]
    out: dict = {"images": len(items)}
    lit = work / "lib-litdata"
    shutil.rmtree(lit, ignore_errors=True)
    lit.mkdir(parents=True)
    t0 = time.perf_counter()
    shards.write_split(items, lit / "train", cap=cap)
    t_lit = time.perf_counter() - t0
    out["litdata"] = {
        "write_images_per_s": round(len(items) / t_lit, 1),
        "store_mib": round(du(lit) / 2**20, 1),
    }
    try:
        from streaming import MDSWriter
        from streaming.base.util import merge_index
    except ImportError:
        out["mosaicml_streaming"] = "not installed (uv run --group bench ...)"
        return out
    mds = work / "lib-mds"
    shutil.rmtree(mds, ignore_errors=True)
    workers = os.cpu_count() or 1

    def write_part(k: int) -> None:
        with MDSWriter(
            out=str(mds / f"part{k}"), columns={"image": "bytes", "label": "int"}, size_limit="64mb"
        ) as w:
            for path, label in items[k::workers]:
                w.write({"image": encode_capped(path, cap)[0], "label": label})

    import multiprocessing as mp

    t0 = time.perf_counter()
    procs = [mp.get_context("fork").Process(target=write_part, args=(k,)) for k in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    merge_index([str(mds / f"part{k}" / "index.json") for k in range(workers)], str(mds))
    t_mds = time.perf_counter() - t0
    out["mosaicml_streaming"] = {
        "write_images_per_s": round(len(items) / t_mds, 1),
        "store_mib": round(du(mds) / 2**20, 1),
    }

    # Read back in the order the trainer uses (chunk windows), bytes only.
    import torch

    split = shards.StoreSplit(str(lit / "train"), len(items), shards.read_index(lit / "train"))
    order = shards.chunk_window_permutation(split.chunk_sizes, torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for b in range(0, len(order), 256):  # as the loader reads: a batch at a time, sorted
        for i in sorted(order[b : b + 256].tolist()):
            split[i]
    out["litdata"]["read_samples_per_s"] = round(len(order) / (time.perf_counter() - t0), 1)
    from streaming import StreamingDataset as MDSDataset

    ds = MDSDataset(local=str(mds), shuffle=False, batch_size=1)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    for b in range(0, len(perm), 256):
        for i in sorted(perm[b : b + 256]):
            ds[i]
    out["mosaicml_streaming"]["read_samples_per_s"] = round(
        len(perm) / (time.perf_counter() - t0), 1
    )
    log(f"  libraries: {out}")
    return out


def _rate(loader, batches: int, warmup: int = 2) -> float:
    n, t0 = 0, None
    for k, (_x, y) in enumerate(loader):
        if k == warmup:
            t0 = time.perf_counter()
        elif k > warmup:
            n += len(y)
        if k >= warmup + batches:
            break
    return n / (time.perf_counter() - t0)


def bench_stream(
    store: str, folder: Path, batches: int, workers: int = 2, batch: int = 256
) -> dict:
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    from cnn.data import build_loaders

    res: dict = {"batch": batch, "input_size": 224, "workers": workers, "batches": batches}
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tf = v2.Compose([
        v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])  # fmt: skip
    base = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder / "train"), transform=tf),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        prefetch_factor=4,
    )
    res["baseline_imagefolder_images_per_s"] = round(_rate(base, batches), 1)
    log(f"  baseline {res['baseline_imagefolder_images_per_s']} images/s")
    for decoder in ("pil", "torchvision"):
        L = build_loaders(
            store,
            input_size=224,
            style="finetune",
            batch_size=batch,
            num_workers=workers,
            decoder=decoder,
            normalize=(mean, std),
        )
        L.train.set_epoch(0)
        r = round(_rate(L.train.iterate(), batches), 1)
        res[f"store_{decoder}_images_per_s"] = r
        res[f"store_{decoder}_speedup"] = round(r / res["baseline_imagefolder_images_per_s"], 2)
        log(f"  store/{decoder} {r} images/s")
    return res


def bench_pass(store: str) -> dict:
    code = (
        "import json, time\n"
        "from cnn.data import build_loaders\n"
        f"L = build_loaders({store!r}, input_size=224, style='finetune', batch_size=256,"
        " num_workers=2)\n"
        "L.train.set_epoch(0); n = 0; t0 = time.perf_counter(); last = t0\n"
        "for x, y in L.train:\n"
        "    n += len(y)\n"
        "    if time.perf_counter() - last > 30:\n"
        "        last = time.perf_counter(); r = n / (last - t0)\n"
        "        print(f'pass {n}/{L.train.num_samples} {r:.0f} images/s ETA "
        "{(L.train.num_samples - n) / r:.0f} s', file=__import__('sys').stderr, flush=True)\n"
        "print(json.dumps({'images': n, 'seconds': time.perf_counter() - t0}))\n"
    )
    secs, rss, out = run_child(code)
    d = json.loads(out)
    return {
        "images": d["images"],
        "images_per_s": round(d["images"] / d["seconds"], 1),
        "peak_rss_gib": rss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--medium", type=Path)
    p.add_argument("--big", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-store"))
    p.add_argument("--cap", type=int, default=None)
    p.add_argument("--steps", default="prepare,libraries,stream,caps,pass")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="toy size, all steps (a smoke run)")
    a = p.parse_args()
    from cnn.data.shards import DEFAULT_CAP

    cap = a.cap or DEFAULT_CAP
    steps = set(a.steps.split(","))
    a.work.mkdir(parents=True, exist_ok=True)
    if a.quick:
        gen = [sys.executable, str(REPO / "benchmarks" / "make_photos.py")]
        a.medium = a.work / "quick-medium"
        subprocess.run([*gen, str(a.medium), "--images", "600", "--classes", "10"], check=True)
        a.big, a.batches, a.batch = None, 3, 32
    out: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "cap": cap,
    }
    stores = {}
    if "prepare" in steps:
        for name, folder in (("medium", a.medium), ("big", a.big)):
            if folder:
                out[f"prepare_{name}"] = bench_prepare(folder, a.work / f"cache-{name}", cap)
                stores[name] = out[f"prepare_{name}"]["path"]
        if "prepare_big" in out and "prepare_medium" in out:
            out["prepare_peak_rss_ratio_big_over_medium"] = round(
                out["prepare_big"]["peak_rss_gib"] / out["prepare_medium"]["peak_rss_gib"], 3
            )
    for name in ("medium", "big"):  # stores prepared by an earlier run of --steps prepare
        found = sorted((a.work / f"cache-{name}").glob("imagefolder-*/meta.json"))
        if name not in stores and found:
            stores[name] = str(found[-1].parent)
    if "libraries" in steps and a.medium:
        out["libraries"] = bench_libraries(a.medium, a.work, cap, 2000 if not a.quick else 300)
    if "stream" in steps and "medium" in stores:
        out["stream"] = bench_stream(stores["medium"], a.medium, a.batches, batch=a.batch)
    if "caps" in steps and a.medium:
        # Decode cost by stored size, on a 25-class subset (5,000 images) of MEDIUM.
        sub = a.work / "caps-src"
        if not sub.exists():
            gen = [sys.executable, str(REPO / "benchmarks" / "make_photos.py")]
            subprocess.run([*gen, str(sub), "--classes", "25", "--link-from", str(a.medium)],
                           check=True)  # fmt: skip
        caps = {}
        for c in (160, 224, 288, 384):
            s = bench_prepare(sub, a.work / f"cache-cap{c}", c)
            r = bench_stream(s["path"], sub, a.batches, batch=a.batch)
            caps[str(c)] = {
                "store_pil_images_per_s": r["store_pil_images_per_s"],
                "baseline_imagefolder_images_per_s": r["baseline_imagefolder_images_per_s"],
                "store_over_source": s["store_over_source"],
            }
        out["caps"] = caps
    if "pass" in steps and "big" in stores:
        out["pass_big"] = bench_pass(stores["big"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
