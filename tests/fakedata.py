"""Tiny, learnable datasets in every source format, and a local HTTP server to serve them.

Generated images are *learnable*: class ``k`` has its own base colour and stripe pattern plus
noise, so end-to-end tests can train a few steps on them and expect better-than-chance accuracy.
Everything here uses the standard library, NumPy and Pillow only, so any test can import it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Ten well-separated colours (RGB), reused cyclically for more classes.
_PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [128, 128, 0],
        [0, 0, 128],
    ],
    dtype=np.float32,
)


def class_image(
    k: int, size: int | tuple[int, int], rng: np.random.Generator, channels: int = 3
) -> np.ndarray:
    """One uint8 HWC image of class ``k``: class colour, class stripe pattern, pixel noise.

    ``size`` is an int (square) or ``(height, width)``. With ``channels=1`` the class is coded by
    brightness and stripe period instead of colour.
    """
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = 4 + 2 * (k % 4)
    # Stripes: horizontal for even classes, vertical for odd classes, scaled to image size.
    coord = (yy if k % 2 == 0 else xx) * (32.0 / max(h, w))
    stripes = ((coord // period) % 2)[..., None] * 40.0 - 20.0
    if channels == 3:
        base = _PALETTE[k % len(_PALETTE)][None, None, :]
    else:
        base = np.array([[[30.0 + (200.0 * (k % 10)) / 9.0]]], dtype=np.float32)
    shift = rng.integers(-1, 2) * 1.0  # tiny per-image jitter in brightness
    noise = rng.normal(0.0, 12.0, size=(h, w, channels)).astype(np.float32)
    img = base + stripes + noise + shift * 5.0
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagefolder(
    root: str | Path,
    classes: Sequence[str] = ("ants", "bees"),
    n_train: int = 12,
    n_val: int = 6,
    size: int | tuple[int, int] = 32,
    formats: Sequence[str] = ("jpg", "png"),
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    n_test: int | None = None,
) -> Path:
    """Write ``root/<split>/<class>/<i>.<fmt>`` and return ``root``.

    ``n_train``/``n_val``/``n_test`` are images *per class* (``n_test`` defaults to ``n_val``).
    ``size`` is a square side, or a ``(min, max)`` range from which each image draws its own
    height and width (to exercise resizing). Formats alternate per image.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": n_val, "test": n_val if n_test is None else n_test}
    for split in splits:
        for k, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                if isinstance(size, int):
                    hw: int | tuple[int, int] = size
                else:
                    hw = (
                        int(rng.integers(size[0], size[1] + 1)),
                        int(rng.integers(size[0], size[1] + 1)),
                    )
                arr = class_image(k, hw, rng)
                fmt = formats[i % len(formats)]
                path = d / f"{i:04d}.{fmt}"
                img = Image.fromarray(arr)
                if fmt in ("jpg", "jpeg"):
                    img.save(path, quality=95)
                else:
                    img.save(path)
    return root


def _labels_images(
    n_per_class: int, num_classes: int, size: int, channels: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (N, H, W, C) uint8 images and their int labels."""
    labels = np.repeat(np.arange(num_classes), n_per_class)
    rng.shuffle(labels)
    images = np.stack([class_image(int(k), size, rng, channels) for k in labels])
    return images, labels


def make_cifar_batches(
    root: str | Path,
    variant: str = "cifar10",
    n_train_per_class: int = 6,
    n_test_per_class: int = 3,
    num_classes: int | None = None,
    seed: int = 0,
) -> Path:
    """Write CIFAR python-pickle batches as the official archive lays them out; return the folder.

    ``cifar10``: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` with
    ``labels``/``label_names``. ``cifar100``: ``cifar-100-python/{train,test,meta}`` with
    ``fine_labels``/``fine_label_names``.
    """
    rng = np.random.default_rng(seed)
    if variant == "cifar10":
        nc = num_classes or 10
        folder = Path(root) / "cifar-10-batches-py"
        label_key, names_key, meta_name = "labels", "label_names", "batches.meta"
        names = [f"class{k}" for k in range(nc)]
    elif variant == "cifar100":
        nc = num_classes or 100
        folder = Path(root) / "cifar-100-python"
        label_key, names_key, meta_name = "fine_labels", "fine_label_names", "meta"
        names = [f"fine{k:03d}" for k in range(nc)]
    else:
        raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR rows are CHW
        entry = {"data": data, label_key: [int(x) for x in labels], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry))

    train_x, train_y = _labels_images(n_train_per_class, nc, 32, 3, rng)
    test_x, test_y = _labels_images(n_test_per_class, nc, 32, 3, rng)
    if variant == "cifar10":
        for b, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
            dump(f"data_batch_{b}", train_x[part], train_y[part])
        dump("test_batch", test_x, test_y)
    else:
        dump("train", train_x, train_y)
        dump("test", test_x, test_y)
    (folder / meta_name).write_bytes(pickle.dumps({names_key: names}))
    return folder


def _idx_bytes(array: np.ndarray) -> bytes:
    """The big-endian idx format of MNIST (type 0x08 = uint8)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_mnist_idx(
    root: str | Path,
    n_train_per_class: int = 6,
    n_test_per_class: int = 3,
    gz: bool = True,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the four MNIST/Fashion-MNIST idx files (gzipped by default); return name -> path."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train_per_class), ("t10k", n_test_per_class)):
        x, y = _labels_images(n, 10, 28, 1, rng)
        for kind, arr in (("images-idx3-ubyte", x[..., 0]), ("labels-idx1-ubyte", y)):
            name = f"{prefix}-{kind}" + (".gz" if gz else "")
            raw = _idx_bytes(arr)
            # mtime=0 keeps the gzip bytes (and so the md5) reproducible.
            data = gzip.compress(raw, mtime=0) if gz else raw
            (root / name).write_bytes(data)
            out[name] = root / name
    return out


def make_tar_gz(path: str | Path, folder: str | Path, arcname: str | None = None) -> Path:
    """Pack ``folder`` into a reproducible ``.tar.gz`` (fixed mtimes), like official archives."""
    folder = Path(folder)
    path = Path(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def fixed(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info

        tar.add(folder, arcname=arcname or folder.name, filter=fixed)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


def md5_of(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


@dataclass
class FileServer:
    """A real HTTP server on 127.0.0.1 serving in-memory files, with fault injection.

    ``faults[name]`` is a list of actions consumed one per request before normal service:
    ``"truncate"`` (send half the body, then close), ``"corrupt"`` (flip bytes, full length),
    ``"error"`` (HTTP 503). ``requests`` counts GETs per file name.
    """

    files: dict[str, bytes]
    faults: dict[str, list[str]] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)
    url: str = ""

    def add(self, name: str, data: bytes) -> None:
        self.files[name] = data

    def fail(self, name: str, *actions: str) -> None:
        self.faults.setdefault(name, []).extend(actions)


def _handler(server: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            name = self.path.lstrip("/").split("?")[0]
            # Strip any base path so a mirror URL like http://host/base/ still works.
            name = name.rsplit("/", 1)[-1]
            server.requests[name] += 1
            if name not in server.files:
                self.send_error(404)
                return
            body = server.files[name]
            actions = server.faults.get(name) or []
            action = actions.pop(0) if actions else None
            if action == "error":
                self.send_error(503, "injected failure")
                return
            if action == "corrupt":
                body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if action == "truncate":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    return Handler


@contextmanager
def serve_files(files: dict[str, bytes] | None = None) -> Iterator[FileServer]:
    """Serve ``files`` on ``http://127.0.0.1:<free port>/`` for the duration of the block."""
    state = FileServer(files=dict(files or {}))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
