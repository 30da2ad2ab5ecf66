"""The one place that opens, decodes and re-encodes image files (both stores use it).

Every file is checked against a pixel limit from its header *before* any pixel is decoded, so a
small PNG that claims 30000x30000 pixels is refused by name instead of filling memory.
"""

from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Pillow's own decompression-bomb limit (about 89 M pixels, a 9459x9459 image).
MAX_IMAGE_PIXELS = 89_478_485
JPEG_QUALITY = 90
# EXIF tag 0x0112: how a camera stored the picture (1 = upright; 3, 6, 8 = rotated 180, 90 CW,
# 90 CCW; 2, 4, 5, 7 mirrored). Phones store photos sideways with this tag, and every viewer
# applies it; so does every decoder here, or a folder of phone photos trains on sideways images.
ORIENTATION = 0x0112


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
    try:
        _check_pixels(path, *img.size, max_pixels)
    except ValueError:
        img.close()
        raise
    return img


def _check_pixels(path: str | Path, w: int, h: int, max_pixels: int) -> None:
    if max_pixels and w * h > max_pixels:
        raise ValueError(
            f"{path} is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}; "
            "resize it, remove it, or raise the limit with --set max_image_pixels=N"
        )


_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame markers


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG or PNG from its bytes, or None for anything else.

    Written by hand because it is the per-image cost of the pixel check: on 32x32 CIFAR JPEGs,
    parsing the header with ``Image.open`` before decoding halved the prepare rate; walking
    the JPEG markers (or reading PNG's IHDR) in the bytes already read costs microseconds.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in _SOF:
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        else:
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """`img.convert("RGB")`, except that 16-bit grayscale (modes I;16*, I) keeps its 8 high
    bits: PIL's own conversion clips every value above 255 to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.max(initial=0) > 255:  # 16-bit data (PIL opens some 16-bit PNGs as "I")
            values = values >> 8
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def decode_file(
    path: str | Path, size_hint: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Decode one file to uint8 RGB CHW (first frame of an animation).

    ``torchvision.io.decode_image`` (JPEG/PNG/GIF/WebP) is about 3x faster than PIL on small
    JPEGs with identical pixels; PIL covers the other formats (BMP, TIFF, PPM, ...), decoding
    JPEGs at a reduced DCT scale when ``size_hint`` allows.
    """
    from torchvision.io import ImageReadMode, decode_image  # here: see cnn.data's docstring

    raw = Path(path).read_bytes()
    size = header_size(raw)
    if size is not None:  # JPEG/PNG: checked from the bytes, decoded by torchvision
        _check_pixels(path, *size, max_pixels)
        with contextlib.suppress(RuntimeError):  # e.g. a PNG variant libpng refuses: PIL below
            x = decode_image(
                torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
            if x.dtype == torch.uint16:  # a 16-bit PNG: its 8 high bits (no uint16 shift op)
                x = (x.to(torch.int32) >> 8).to(torch.uint8)
            return x[0] if x.ndim == 4 else x
    with open_checked(path, max_pixels) as img:
        fmt, upright = img.format, _orientation(img) == 1
    if size is None and fmt in ("GIF", "WEBP") and upright:  # torchvision ignores their EXIF
        with contextlib.suppress(RuntimeError):  # a variant torchvision refuses: PIL below
            x = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), ImageReadMode.RGB)
            return x[0] if x.ndim == 4 else x
    with open_checked(path, max_pixels) as img:
        img.draft("RGB", (size_hint, size_hint))
        rgb = to_rgb(_upright(img))
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


def _upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says; as it is when that EXIF block is malformed
    (a viewer shows such a file unturned too)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1, upright, when there is none)."""
    try:
        return int(img.getexif().get(ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: decoders ignore it too
        return 1


def encode_capped(
    path: str | Path, cap: int, quality: int = JPEG_QUALITY, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[bytes, int, int]:
    """The file as JPEG bytes with the shorter side at most ``cap``, aspect ratio kept.

    An RGB or grayscale JPEG already within the cap is stored byte for byte (no generation
    loss, no work); anything else is decoded (at a reduced DCT scale when the JPEG is much
    larger than the cap), resized so its shorter side equals ``cap`` and re-encoded.
    A photo with an EXIF orientation is stored upright (rotated, re-encoded, no tag left), so
    that every reader of the store sees what a viewer shows.
    Returns (bytes, height, width) of the stored image.
    """
    with open_checked(path, max_pixels) as img:
        w, h = img.size
        orientation = _orientation(img)
        if (
            img.format == "JPEG"
            and img.mode in ("RGB", "L")
            and min(w, h) <= cap
            and orientation == 1
        ):
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
        upright = _upright(img)
        if upright.size != img.size:  # a quarter turn (Pillow's TIFF reader turns on open)
            tw, th = th, tw
        rgb = to_rgb(upright)
        if rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), th, tw
