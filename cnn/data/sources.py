"""Dataset sources: specs, verified downloads, safe extraction, readers, image-folder scanning.

Downloads are hand-written on ``urllib`` rather than ``torchvision.datasets.utils.download_url``
because we need retry with exponential backoff, delete-and-refetch on a checksum mismatch, a
mirror override, and an error naming expected and actual checksums; torchvision's helper has
none of these. The remote file names and official md5s come from torchvision's dataset classes,
so there is one source of truth for them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import os
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..atomic import atomic_write
from ..folders import find_folder_root, visible_entries

log = logging.getLogger(__name__)

MIRROR_ENV = "CNNPIPE_DATA_MIRROR"
# torchvision's IMG_EXTENSIONS plus GIF (the ants/bees set has a valid `imageNotFound.gif`),
# written out so that scanning a folder needs no torchvision (tests/test_data_sources.py keeps
# it equal to torchvision's list).
IMAGE_EXTENSIONS = (
    ".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"
)  # fmt: skip
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its name, md5, and the URLs to try in order."""

    filename: str
    md5: str
    urls: tuple[str, ...]


@dataclass(frozen=True)
class SourceSpec:
    """A downloadable dataset: which files, and which reader turns them into tensors.

    ``kind`` is ``"cifar10"``, ``"cifar100"``, ``"mnist"`` or ``"fashion-mnist"`` (the reader).
    Build a custom one (e.g. pointing at generated files and their md5s) with
    ``dataclasses.replace(get_source("cifar10"), files=(...,))`` and pass it to
    ``prepare_dataset`` instead of a name.
    """

    name: str
    kind: str
    files: tuple[RemoteFile, ...]


def _urls(filename: str, bases: Sequence[str]) -> tuple[str, ...]:
    return tuple(b.rstrip("/") + "/" + filename for b in bases)


def _cifar_spec(name: str, cls: Any) -> SourceSpec:
    base = cls.url.rsplit("/", 1)[0]
    return SourceSpec(
        name, name, (RemoteFile(cls.filename, cls.tgz_md5, _urls(cls.filename, [base])),)
    )


def _mnist_spec(name: str, cls: Any) -> SourceSpec:
    files = tuple(RemoteFile(f, md5, _urls(f, cls.mirrors)) for f, md5 in cls.resources)
    return SourceSpec(name, name, files)


@functools.cache
def _sources() -> dict[str, SourceSpec]:
    """The specs, from torchvision's dataset classes (their URLs and md5s): built on first use,
    so an image-folder job never imports torchvision for them."""
    import torchvision.datasets as tvd

    return {
        "cifar10": _cifar_spec("cifar10", tvd.CIFAR10),
        "cifar100": _cifar_spec("cifar100", tvd.CIFAR100),
        "mnist": _mnist_spec("mnist", tvd.MNIST),
        "fashion-mnist": _mnist_spec("fashion-mnist", tvd.FashionMNIST),
    }


DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")


def get_source(name: str) -> SourceSpec:
    """The spec of a downloadable dataset; a bad name lists the valid ones."""
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist"}.get(key, key)
    if key not in DATASETS or key == "imagefolder":
        raise ValueError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} "
            "(use 'imagefolder' for a directory of train/<class>/<image> files)"
        )
    return _sources()[key]


# --------------------------------------------------------------------------------------------
# Verified download
# --------------------------------------------------------------------------------------------


class ChecksumError(ValueError):
    """A downloaded file's md5 differs from the spec's (twice in a row)."""


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_urls(file: RemoteFile, mirror: str | None = None) -> tuple[str, ...]:
    """The URLs to try: the mirror (argument, else ``$CNNPIPE_DATA_MIRROR``) first, if any."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror:
        return (mirror.rstrip("/") + "/" + file.filename,)
    return file.urls


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Stream ``url`` to ``dest`` atomically; a short body raises, leaving nothing."""
    req = urllib.request.Request(url, headers={"User-Agent": "cnnpipe"})
    # A fresh opener per request reads the proxy settings as they are now; the module-level
    # urlopen() freezes them at its first call in the process.
    opener = urllib.request.build_opener()
    with opener.open(req, timeout=timeout) as resp:

        def write(out: IO[bytes]) -> None:
            expected = resp.headers.get("Content-Length")
            shutil.copyfileobj(resp, out, 1 << 20)
            if expected is not None and out.tell() != int(expected):
                raise urllib.error.ContentTooShortError(
                    f"got {out.tell()} of {expected} bytes from {url}", None
                )

        atomic_write(dest, write)


def download_file(
    file: RemoteFile,
    dest_dir: str | Path,
    *,
    mirror: str | None = None,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 60.0,
) -> Path:
    """Download ``file`` into ``dest_dir`` and verify its md5; return its path.

    An existing file with the right md5 is reused. Network errors (including a truncated body)
    are retried ``retries`` times per URL with exponential backoff (``backoff * 2**attempt`` s),
    then the next URL is tried. A checksum mismatch deletes the file and fetches once more; a
    second mismatch raises ``ChecksumError`` naming the file and both checksums.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / file.filename
    if dest.exists() and md5sum(dest) == file.md5:
        return dest
    dest.unlink(missing_ok=True)
    urls = resolve_urls(file, mirror)
    mismatches = 0
    while True:
        _fetch_with_retries(urls, dest, retries=retries, backoff=backoff, timeout=timeout)
        actual = md5sum(dest)
        if actual == file.md5:
            return dest
        dest.unlink(missing_ok=True)
        mismatches += 1
        if mismatches >= 2:
            raise ChecksumError(
                f"checksum mismatch for {file.filename} (from {', '.join(urls)}): expected md5 "
                f"{file.md5}, got {actual} twice; the file was removed. Check the mirror "
                f"(${MIRROR_ENV}) or download it by hand into {dest_dir}"
            )
        log.warning("md5 mismatch for %s (got %s, want %s); fetching again", dest, actual, file.md5)


def _fetch_with_retries(
    urls: Sequence[str], dest: Path, *, retries: int, backoff: float, timeout: float
) -> None:
    errors = []
    for url in urls:
        for attempt in range(retries + 1):
            try:
                print(f"downloading {url} -> {dest}", flush=True)
                _fetch(url, dest, timeout)
                return
            except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
                # HTTPError is a URLError: a 404 will not heal, so move on to the next URL.
                errors.append(f"{url}: {exc}")
                if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                    break
                if attempt < retries:
                    delay = backoff * (2**attempt)
                    log.warning("download of %s failed (%s); retry in %.1f s", url, exc, delay)
                    time.sleep(delay)
    raise ConnectionError(
        f"could not download {dest.name} after retries: "
        + "; ".join(errors[-3:])
        + f". Without internet, set ${MIRROR_ENV} to a reachable mirror, or put the file in "
        f"{dest.parent}"
    )


# --------------------------------------------------------------------------------------------
# Safe extraction
# --------------------------------------------------------------------------------------------


class UnsafeArchiveError(ValueError):
    """An archive member would escape the target directory, or is a link or device."""


def _check_member_path(name: str, target: Path, archive: Path) -> Path:
    dest = (target / name).resolve()
    if Path(name).is_absolute() or (dest != target and target not in dest.parents):
        raise UnsafeArchiveError(
            f"refusing to extract {archive.name}: member {name!r} would be written outside {target}"
        )
    return dest


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a tar(.gz/.bz2/.xz) or zip archive into ``target``, refusing unsafe members.

    Every member is checked *before* anything is written: a path that leaves ``target``
    (absolute or ``..``), a symlink or hardlink, or a device/FIFO raises ``UnsafeArchiveError``.
    Tar extraction also passes ``filter="data"`` as a second line of defence.
    """
    archive = Path(archive)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member_path(info.filename, target, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UnsafeArchiveError(
                        f"refusing to extract {archive.name}: member {info.filename!r} is a link"
                    )
            zf.extractall(target)
        return target
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            _check_member_path(m.name, target, archive)
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(
                    f"refusing to extract {archive.name}: member {m.name!r} is a "
                    f"{'symlink' if m.issym() else 'hardlink'} to {m.linkname!r}"
                )
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(
                    f"refusing to extract {archive.name}: member {m.name!r} is a device or FIFO"
                )
        tar.extractall(target, members=members, filter="data")
    return target


# --------------------------------------------------------------------------------------------
# Readers for the torchvision formats
# --------------------------------------------------------------------------------------------


@dataclass
class RawSplit:
    """One split as decoded uint8 NCHW images and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor


@functools.cache
def _readers() -> dict[str, Any]:
    """torchvision's dataset class that reads each kind (imported on first use).

    torchvision's CIFAR classes check each batch file against the *official* md5s, which any
    other bytes (our generated test archives, a re-packed mirror) cannot match. We verify the
    archive's md5 against the spec on download, so these subclasses clear the per-member md5s
    (torchvision's `check_integrity(path, None)` then only checks that the file exists) and
    otherwise use torchvision's reader unchanged."""
    import torchvision.datasets as tvd

    class CIFAR10Files(tvd.CIFAR10):
        train_list = [[f, None] for f, _ in tvd.CIFAR10.train_list]
        test_list = [[f, None] for f, _ in tvd.CIFAR10.test_list]
        meta = {**tvd.CIFAR10.meta, "md5": None}

    class CIFAR100Files(tvd.CIFAR100):
        train_list = [[f, None] for f, _ in tvd.CIFAR100.train_list]
        test_list = [[f, None] for f, _ in tvd.CIFAR100.test_list]
        meta = {**tvd.CIFAR100.meta, "md5": None}

    return {"cifar10": CIFAR10Files, "cifar100": CIFAR100Files,
            "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}  # fmt: skip


def __getattr__(name: str) -> Any:
    """`SOURCES` and the CIFAR reader classes, built on first use (see `_sources`)."""
    if name == "SOURCES":
        return _sources()
    if name in ("CIFAR10Files", "CIFAR100Files"):
        return _readers()[name.removesuffix("Files").lower()]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fetch_source(
    spec: SourceSpec, raw_dir: str | Path, *, download: bool = True, mirror: str | None = None
) -> Path:
    """Make sure the spec's files are present and verified in ``raw_dir``; unpack them.

    Returns the root that the torchvision reader takes.
    """
    raw_dir = Path(raw_dir)
    paths = []
    for f in spec.files:
        p = raw_dir / f.filename
        if not download and not (p.exists() and md5sum(p) == f.md5):
            raise FileNotFoundError(
                f"{p} is missing or has the wrong md5 (want {f.md5}) and download=False; "
                "allow downloading or place the file there"
            )
        paths.append(download_file(f, raw_dir, mirror=mirror))
    root = raw_dir / "extracted"
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == _files_digest(spec):
        return root
    if root.exists():
        shutil.rmtree(root)
    if spec.kind in ("cifar10", "cifar100"):
        safe_extract(paths[0], root)
    else:
        # torchvision's MNIST reader wants the *uncompressed* idx files in <root>/<Class>/raw.
        cls_dir = root / _readers()[spec.kind].__name__ / "raw"
        cls_dir.mkdir(parents=True, exist_ok=True)
        for p in paths:
            out = cls_dir / (p.name[:-3] if p.suffix == ".gz" else p.name)
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    marker.write_text(_files_digest(spec))
    return root


def _files_digest(spec: SourceSpec) -> str:
    return ",".join(f"{f.filename}:{f.md5}" for f in spec.files)


def read_source(spec: SourceSpec, root: str | Path) -> tuple[dict[str, RawSplit], list[str]]:
    """Read train and test with torchvision's dataset classes; returns (splits, class names)."""
    cls = _readers()[spec.kind]
    out = {}
    classes: list[str] = []
    for split, train in (("train", True), ("test", False)):
        ds = cls(str(root), train=train, download=False)
        data = ds.data
        if isinstance(data, np.ndarray):  # CIFAR: N,H,W,C numpy
            images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
        else:  # MNIST: N,H,W uint8 tensor
            images = data.unsqueeze(1).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        out[split] = RawSplit(images, labels)
        classes = list(ds.classes)
    return out, classes


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


@dataclass
class FolderScan:
    """The files of an image folder, per split, with labels from sorted class folders."""

    root: Path
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(relative path, label)]
    content_hash: str

    def paths(self, split: str) -> list[Path]:
        return [self.root / rel for rel, _ in self.files[split]]

    def labels(self, split: str) -> torch.Tensor:
        return torch.tensor([lab for _, lab in self.files[split]], dtype=torch.int64)


def scan_imagefolder(data_dir: str | Path) -> FolderScan:
    """List every image per split and hash the listing (paths, sizes, mtimes).

    Hand-written on ``os.scandir`` instead of ``torchvision.datasets.ImageFolder`` because we
    need each file's size and mtime for the content hash anyway, and scandir gives them without
    an extra ``stat`` per file (50,000 files). Classes are the sorted folder names of train/;
    a split with other classes, or an empty class folder, is an error.
    """
    root = find_folder_root(data_dir)
    h = hashlib.sha256()
    classes = [e.name for e in visible_entries(root / "train") if e.is_dir()]
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders; expected train/<class>/<image>")
    files: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        sdir = root / split
        if not sdir.is_dir():
            continue
        split_classes = [e.name for e in visible_entries(sdir) if e.is_dir()]
        if split_classes != classes:
            missing = sorted(set(classes) - set(split_classes))
            extra = sorted(set(split_classes) - set(classes))
            raise ValueError(
                f"class folders of {sdir} differ from train's: missing {missing}, extra {extra}; "
                "every split needs the same <class> folders"
            )
        items = []
        for label, cls in enumerate(classes):
            images = [e for e in visible_entries(sdir / cls)
                      if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]  # fmt: skip
            if not images:
                raise ValueError(
                    f"class folder {sdir / cls} has no images (extensions: "
                    f"{' '.join(IMAGE_EXTENSIONS)}); remove the folder or add images"
                )
            for e in images:
                st = e.stat()
                rel = f"{split}/{cls}/{e.name}"
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                items.append((rel, label))
        files[split] = items
    return FolderScan(root, classes, files, h.hexdigest())
