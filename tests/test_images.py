"""The one image decoder (cnn/data/images.py): header sizes from the bytes, the pixel limit
before any decode, the same pixels as Pillow."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn.data.images import decode_file, header_size


def _encoded(fmt: str, size: tuple[int, int], **kw) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("JPEG", {"exif": Image.Exif() or b"Exif\x00\x00" + b"\x00" * 3000}),
        ("PNG", {}),
    ],
)
def test_header_size_matches_pillow(fmt: str, kw: dict) -> None:
    for size in [(32, 32), (500, 375), (17, 301)]:
        data = _encoded(fmt, size, **kw)
        assert header_size(data) == size == Image.open(io.BytesIO(data)).size


def test_other_formats_and_garbage_fall_back() -> None:
    assert header_size(_encoded("GIF", (20, 10))) is None
    assert header_size(_encoded("BMP", (20, 10))) is None
    assert header_size(b"\xff\xd8\x00garbage") is None
    assert header_size(b"") is None


def _png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    with pytest.raises(ValueError, match=r"bomb.png is 30000x30000 .* max_image_pixels"):
        decode_file(bomb, 32)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_decode_file_gives_pillows_pixels(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_encoded(fmt, (40, 24)))
    x = decode_file(path, 40)
    ref = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert tuple(x.shape) == (3, 24, 40)
    assert np.abs(x.numpy().astype(int) - ref.astype(int)).mean() < 2  # same decoder family


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_grayscale_keeps_its_high_bits(tmp_path: Path, fmt: str) -> None:
    """A 16-bit image (microscopy, medical, scanned film) decodes to its 8 high bits in the
    data layer and in predict: not clipped to white (PIL's convert) nor refused (torchvision's
    uint16 PNGs)."""
    from cnn.data.images import encode_capped
    from cnn.export import load_image

    values = np.random.default_rng(0).integers(0, 65536, (12, 10), dtype=np.uint16)
    path = tmp_path / f"deep.{fmt}"
    Image.fromarray(values).save(path)
    want = (values >> 8).astype(np.uint8)
    for rgb in (decode_file(path, 64), load_image(path)):
        assert str(rgb.dtype) == "torch.uint8" and rgb.shape == (3, 12, 10)
        assert np.array_equal(rgb[0].numpy(), want) and np.array_equal(rgb[2].numpy(), want)
    data, h, w = encode_capped(path, cap=64)  # the shard store's re-encoded JPEG
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("L")).astype(int)
    assert (h, w) == (12, 10) and np.abs(stored - want).mean() < 8  # JPEG, not white


def _gradient() -> np.ndarray:
    """A 40x24 RGB picture with no symmetry (a turn or mirror changes it) that JPEG keeps well."""
    yy, xx = np.mgrid[0:24, 0:40]
    return np.stack([xx * 6, yy * 10, 255 - xx * 6], axis=-1).astype(np.uint8)


def _photo_with_orientation(path: Path, orientation: int, fmt: str = "JPEG") -> np.ndarray:
    """A 40x24 picture saved with an EXIF orientation tag (as phones store photos); returns the
    upright pixels a viewer shows (HWC), which is what every decoder here must return."""
    pixels = _gradient()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format=fmt, exif=exif, quality=95)
    from PIL import ImageOps

    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, fmt: str) -> None:
    """A phone photo stored sideways with an orientation tag is decoded upright, the way every
    viewer shows it, in the tensor cache, the shard store and predict alike."""
    from cnn.data.images import encode_capped
    from cnn.export import load_image

    path = tmp_path / f"photo.{fmt.lower()}"
    upright = _photo_with_orientation(path, orientation, fmt).astype(int)
    h, w = upright.shape[:2]
    assert (h, w) == ((40, 24) if orientation in (6, 8) else (24, 40))
    for rgb in (decode_file(path, 64), load_image(path)):
        assert tuple(rgb.shape) == (3, h, w)
        assert np.abs(rgb.permute(1, 2, 0).numpy().astype(int) - upright).mean() < 3
    for cap in (64, 12):  # stored as is (within the cap) or downscaled: upright either way
        data, sh, sw = encode_capped(path, cap=cap)
        with Image.open(io.BytesIO(data)) as img:
            assert img.getexif().get(0x0112, 1) == 1  # nothing left for a decoder to apply
            stored = np.asarray(img.convert("RGB")).astype(int)
        assert stored.shape[:2] == (sh, sw) and min(sh, sw) == min(cap, 24)
        assert (sh > sw) == (h > w)
        if cap == 64:
            assert np.abs(stored - upright).mean() < 4


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00" + b"\x00" * 300,  # no TIFF header
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00",
    ],
    ids=["garbage", "truncated", "orientation-9"],
)
def test_malformed_exif_decodes_unturned(tmp_path: Path, exif: bytes) -> None:
    """A broken EXIF block (or an orientation outside 1-8) is ignored, as viewers do: the image
    decodes as stored instead of failing the dataset."""
    from cnn.data.images import encode_capped

    pixels = _gradient()
    for fmt in ("JPEG", "PNG"):
        path = tmp_path / f"x.{fmt.lower()}"
        Image.fromarray(pixels).save(path, format=fmt, exif=exif, quality=95)
        x = decode_file(path, 64)
        assert tuple(x.shape) == (3, 24, 40)
        assert np.abs(x.permute(1, 2, 0).numpy().astype(int) - pixels.astype(int)).mean() < 8
        assert encode_capped(path, cap=64)[1:] == (24, 40)
