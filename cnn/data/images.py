"""The one place that opens, decodes and re-encodes image files (both stores use it).

Every file is checked against a pixel limit from its header *before* any pixel is decoded, so a
small PNG that claims 30000x30000 pixels is refused by name instead of filling memory.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file

# Pillow's own decompression-bomb limit (about 89 M pixels, a 9459x9459 image).
MAX_IMAGE_PIXELS = 89_478_485
JPEG_QUALITY = 90


def open_checked(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``Image.open`` (header only) that refuses images above ``max_pixels``, naming the file.

    Pillow's own check is lifted here because ours replaces it: it warns at 89 M pixels and
    raises only at twice that, with a message that does not say how to proceed.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        img.close()
        raise ValueError(
            f"{path} is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}; "
            "resize it, remove it, or raise the limit with --set max_image_pixels=N"
        )
    return img


def decode_file(
    path: str | Path, size_hint: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Decode one file to uint8 RGB CHW (first frame of an animation).

    ``torchvision.io.decode_image`` (JPEG/PNG/GIF/WebP) is about 3x faster than PIL on small
    JPEGs with identical pixels; PIL covers the other formats (BMP, TIFF, PPM, ...), decoding
    JPEGs at a reduced DCT scale when ``size_hint`` allows.
    """
    with open_checked(path, max_pixels) as img:
        fmt = img.format
    if fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        try:
            x = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
            return x[0] if x.ndim == 4 else x
        except RuntimeError:
            pass  # e.g. a PNG variant libpng refuses: PIL below
    with open_checked(path, max_pixels) as img:
        img.draft("RGB", (size_hint, size_hint))
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def encode_capped(
    path: str | Path, cap: int, quality: int = JPEG_QUALITY, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[bytes, int, int]:
    """The file as JPEG bytes with the shorter side at most ``cap``, aspect ratio kept.

    An RGB or grayscale JPEG already within the cap is stored byte for byte (no generation
    loss, no work); anything else is decoded (at a reduced DCT scale when the JPEG is much
    larger than the cap), resized so its shorter side equals ``cap`` and re-encoded.
    Returns (bytes, height, width) of the stored image.
    """
    with open_checked(path, max_pixels) as img:
        w, h = img.size
        if img.format == "JPEG" and img.mode in ("RGB", "L") and min(w, h) <= cap:
            # Verify it decodes (at 1/8 scale: the whole entropy stream is read, a truncated or
            # corrupt file fails here by name, not in a training worker).
            img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()
            return Path(path).read_bytes(), h, w
        scale = min(1.0, cap / min(w, h))
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        if img.format == "JPEG":
            img.draft("RGB", (tw, th))  # DCT-scaled decode: never below the target size
        img.seek(0)
        rgb = img.convert("RGB")
        if rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), th, tw
