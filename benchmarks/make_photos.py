"""Generate an ImageNet-like JPEG folder for the data-at-scale benchmarks (issue 11).

    uv run python benchmarks/make_photos.py OUT --images 200000 --classes 1000 [--workers 2]

``OUT/train/<class>/<i>.jpg``: sizes vary around 500x375 (landscape and portrait, 4:3, 3:2,
1:1), content is photo-like (smooth colour fields, a few shapes in a class-dependent colour,
sensor-like noise), so JPEGs are about the size of real photos (~100 KB) rather than a constant
colour that compresses to nothing. Deterministic in (seed, image index). ``--link-from BIG``
fills OUT with hard links to the first ``--classes`` class folders of an existing folder
instead (a medium folder that costs no generation time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = [(500, 375), (375, 500), (500, 333), (333, 500), (400, 400), (600, 450), (480, 360)]
_NOISE = None


def _noise_bank(rng: np.random.Generator) -> np.ndarray:
    global _NOISE
    if _NOISE is None:
        _NOISE = rng.normal(0, 10, size=(800, 800, 3)).astype(np.int16)
    return _NOISE


def photo(index: int, label: int, seed: int = 0) -> Image.Image:
    """One photo-like RGB image, deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    w, h = _SHAPES[index % len(_SHAPES)]
    jitter = rng.uniform(0.85, 1.15)
    w, h = int(w * jitter), int(h * jitter)
    # Smooth colour field: a tiny random image upscaled (bicubic) -> large soft gradients.
    field = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    cls_rng = np.random.default_rng([seed, 10_000_000 + label])
    colour = tuple(int(c) for c in cls_rng.integers(0, 256, 3))
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    noise = _noise_bank(rng)
    oy, ox = int(rng.integers(0, 800 - h + 1)), int(rng.integers(0, 800 - w + 1))
    arr = np.asarray(img, dtype=np.int16) + noise[oy : oy + h, ox : ox + w]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write(job: tuple[str, int, int, int]) -> int:
    path, index, label, seed = job
    if not os.path.exists(path):
        photo(index, label, seed).save(path, quality=90)
    return index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--link-from", type=Path, default=None)
    a = p.parse_args()
    if a.link_from is not None:
        src = a.link_from / "train"
        for cls in sorted(os.listdir(src))[: a.classes]:
            (a.out / "train" / cls).mkdir(parents=True, exist_ok=True)
            for f in os.listdir(src / cls):
                dst = a.out / "train" / cls / f
                if not dst.exists():
                    os.link(src / cls / f, dst)
        return
    names = [f"n{k:05d}" for k in range(a.classes)]
    for n in names:
        (a.out / "train" / n).mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(a.out / "train" / names[i % a.classes] / f"{i:07d}.jpg"), i, i % a.classes, a.seed)
        for i in range(a.images)
    ]
    t0 = last = time.time()
    with get_context("fork").Pool(a.workers) as pool:
        for done, _ in enumerate(pool.imap_unordered(_write, jobs, chunksize=64), 1):
            if time.time() - last > 20 or done == len(jobs):
                last = time.time()
                rate = done / (last - t0)
                print(
                    f"{done}/{len(jobs)} images, {rate:.0f}/s, ETA "
                    f"{(len(jobs) - done) / rate:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )


if __name__ == "__main__":
    main()
