"""What the shard store's shorter-side cap costs in accuracy (issue 11): prints one JSON object.

    uv run python benchmarks/bench_cap_accuracy.py [--data-dir ../shared/data] [--epochs 3]

A short fine-tune of ImageNet-pretrained MobileNetV2 (the shared, locally stored weights) on the
ants/bees set (245 train / 153 val photos, ~500x375), recipe ``mobilenet_v2-hymenoptera``, from
the shard store at each cap, and from the in-memory tensor cache (256-px center-cropped squares,
the previous only path) as the baseline, same seeds, same machine, one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnn.config import resolve_config  # noqa: E402
from cnn.train import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--freeze-backbone", action="store_true", help="train the head only (fast)")
    p.add_argument("--caps", default="160,288")
    p.add_argument("--seeds", default="0")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-cap-"))
    if not (work / "hymenoptera_data").exists():
        with tarfile.open(a.data_dir / "hymenoptera_data.tar.gz") as tar:
            tar.extractall(work, filter="data")
    weights = a.data_dir / "mobilenet_v2-imagenet-dequantized.pth"
    variants = [("memory-256", {"storage": "memory"})] + [
        (f"shards-{c}", {"storage": "shards", "image_cap": int(c)}) for c in a.caps.split(",")
    ]
    out: dict = {"epochs": a.epochs, "model": "mobilenet_v2", "runs": {},
                 "freeze_backbone": a.freeze_backbone}  # fmt: skip
    for name, extra in variants:
        accs = []
        for seed in [int(s) for s in a.seeds.split(",")]:
            cfg = resolve_config(
                model="mobilenet_v2",
                dataset="imagefolder",
                recipe="mobilenet_v2-hymenoptera",
                overrides={
                    "data_dir": str(work / "hymenoptera_data"),
                    "cache_dir": str(work / "cache"),
                    "pretrained": str(weights),
                    "epochs": a.epochs,
                    "seed": seed,
                    "device": "cpu",
                    "skip_bad_images": True,  # the set's one imageNotFound.gif
                    "output_dir": str(work / f"out-{name}-{seed}"),
                    "freeze_backbone": a.freeze_backbone,
                    **extra,
                },
            )
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # training log -> stderr
                res = train(cfg)
            shutil.rmtree(cfg.run.output_dir, ignore_errors=True)
            accs.append(res["best_val_accuracy"])
            print(f"{name} seed {seed}: val {res['best_val_accuracy']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
        out["runs"][name] = {"val_accuracy": accs, "mean": round(sum(accs) / len(accs), 4)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
