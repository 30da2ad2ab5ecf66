"""Download, extraction and torchvision-format tests against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from fakedata import make_cifar_batches, make_mnist_idx, make_tar_gz, md5_of, serve_files

from cnn.data import RemoteFile, build_loaders, get_source, load_prepared, prepare_dataset
from cnn.data.sources import (
    MIRROR_ENV,
    ChecksumError,
    UnsafeArchiveError,
    download_file,
    safe_extract,
)

FAST = dict(retries=3, backoff=0.01, timeout=10)


def _remote(server, name: str, data: bytes) -> RemoteFile:
    server.add(name, data)
    return RemoteFile(name, hashlib.md5(data).hexdigest(), (server.url + name,))


# ---------------------------------------------------------------------------------- downloads


def test_download_verifies_and_reuses(tmp_path: Path) -> None:
    with serve_files() as srv:
        f = _remote(srv, "blob.bin", b"x" * 5000)
        p = download_file(f, tmp_path, **FAST)
        assert p.read_bytes() == b"x" * 5000 and srv.requests["blob.bin"] == 1
        download_file(f, tmp_path, **FAST)  # present with the right md5: no request
        assert srv.requests["blob.bin"] == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin"]  # no temp file left


def test_checksum_mismatch_refetches_once(tmp_path: Path) -> None:
    with serve_files() as srv:
        f = _remote(srv, "blob.bin", bytes(range(256)) * 40)
        srv.fail("blob.bin", "corrupt")
        p = download_file(f, tmp_path, **FAST)
        assert md5_of(p) == f.md5 and srv.requests["blob.bin"] == 2


def test_second_checksum_mismatch_names_file_and_checksums(tmp_path: Path) -> None:
    with serve_files() as srv:
        f = _remote(srv, "blob.bin", bytes(range(256)) * 40)
        srv.fail("blob.bin", "corrupt", "corrupt")
        with pytest.raises(ChecksumError) as err:
            download_file(f, tmp_path, **FAST)
        msg = str(err.value)
        assert "blob.bin" in msg and f"expected md5 {f.md5}" in msg
        bad = bytes(b ^ 0xFF for b in (bytes(range(256)) * 40)[:64]) + (bytes(range(256)) * 40)[64:]
        assert hashlib.md5(bad).hexdigest() in msg
        assert not (tmp_path / "blob.bin").exists()  # the bad file is removed
        assert srv.requests["blob.bin"] == 2


def test_interrupted_download_is_retried(tmp_path: Path) -> None:
    with serve_files() as srv:
        f = _remote(srv, "big.bin", b"y" * 100_000)
        srv.fail("big.bin", "truncate", "error")
        p = download_file(f, tmp_path, **FAST)
        assert p.stat().st_size == 100_000 and srv.requests["big.bin"] == 3


def test_download_gives_up_with_clear_error(tmp_path: Path) -> None:
    with serve_files() as srv:
        f = _remote(srv, "blob.bin", b"z" * 100)
        srv.fail("blob.bin", *["error"] * 10)
        with pytest.raises(ConnectionError, match=f"could not download blob.bin.*{MIRROR_ENV}"):
            download_file(f, tmp_path, retries=2, backoff=0.01, timeout=5)
        assert srv.requests["blob.bin"] == 3
        assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file


def test_mirror_env_overrides_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_files() as srv:
        good = _remote(srv, "m.bin", b"mirror data")
        f = dataclasses.replace(good, urls=("http://127.0.0.1:9/unreachable/m.bin",))
        monkeypatch.setenv(MIRROR_ENV, srv.url + "base/")
        assert download_file(f, tmp_path, **FAST).read_bytes() == b"mirror data"
        monkeypatch.delenv(MIRROR_ENV)
        p = download_file(f, tmp_path / "b", mirror=srv.url, **FAST)
        assert p.read_bytes() == b"mirror data"


# ---------------------------------------------------------------------------------- extraction


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ok = tarfile.TarInfo("pkg/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, target
    return m


@pytest.mark.parametrize(
    "member, match",
    [
        (tarfile.TarInfo("../evil.txt"), "outside"),
        (tarfile.TarInfo("pkg/../../evil.txt"), "outside"),
        (tarfile.TarInfo("/tmp/abs-evil.txt"), "outside"),
        (_link("pkg/link", "../../evil.txt", tarfile.SYMTYPE), "symlink"),
        (_link("pkg/hard", "pkg/ok.txt", tarfile.LNKTYPE), "hardlink"),
        (_link("pkg/dev", "", tarfile.CHRTYPE), "device"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, member, match: str) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar_with(member, b"pwned"))
    target = tmp_path / "sandbox" / "out"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, target)
    after = set(tmp_path.rglob("*"))
    # Nothing written anywhere: not outside, and not even the safe member inside.
    assert after - before <= {target, target.parent}
    assert not Path("/tmp/abs-evil.txt").exists()


def test_unsafe_zip_members_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "ok")
        zf.writestr("../evil.txt", "pwned")
    with pytest.raises(UnsafeArchiveError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "ok.txt").exists()
    link = tmp_path / "l.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16  # a symlink entry
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="link"):
        safe_extract(link, tmp_path / "out2")


def test_safe_archive_extracts(tmp_path: Path) -> None:
    src = tmp_path / "src" / "pkg"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hello")
    archive = make_tar_gz(tmp_path / "p.tar.gz", src)
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "pkg" / "sub" / "f.txt").read_text() == "hello"


# --------------------------------------------------------------- torchvision formats via HTTP


def _cifar_spec(srv, tmp_path: Path, variant: str):
    folder = make_cifar_batches(
        tmp_path / "gen",
        variant,
        n_train_per_class=2,
        n_test_per_class=1,
        num_classes=10 if variant == "cifar10" else 20,
    )
    base = get_source(variant)
    name = base.files[0].filename
    archive = make_tar_gz(tmp_path / name, folder)
    f = _remote(srv, name, archive.read_bytes())
    return dataclasses.replace(base, files=(f,))


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_prepare_cifar_from_local_server(tmp_path: Path, variant: str) -> None:
    with serve_files() as srv:
        spec = _cifar_spec(srv, tmp_path, variant)
        srv.fail(spec.files[0].filename, "truncate")  # one interrupted download on the way
        info = prepare_dataset(
            spec, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", val_fraction=0.5
        )
        n_cls = 10 if variant == "cifar10" else 20
        assert info.num_classes == n_cls and info.resolution == 32 and not info.test_is_val
        assert info.splits == {"train": n_cls, "val": n_cls, "test": n_cls}
        assert srv.requests[spec.files[0].filename] == 2
        x, y = load_prepared(info.path).split("test")
        assert x.shape == (n_cls, 3, 32, 32) and x.dtype == torch.uint8
        assert sorted(y.tolist()) == list(range(n_cls))
    # A cache hit needs neither the server nor the raw files.
    again = prepare_dataset(
        spec,
        data_dir=tmp_path / "elsewhere",
        cache_dir=tmp_path / "cache",
        val_fraction=0.5,
        download=False,
    )
    assert again.cache_hit and again.path == info.path


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_prepare_mnist_formats_from_local_server(tmp_path: Path, name: str) -> None:
    files = make_mnist_idx(tmp_path / "gen", n_train_per_class=3, n_test_per_class=1)
    with serve_files() as srv:
        base = get_source(name)
        spec_files = tuple(
            _remote(srv, f.filename, files[f.filename].read_bytes()) for f in base.files
        )
        spec = dataclasses.replace(base, files=spec_files)
        info = prepare_dataset(
            spec, data_dir=tmp_path / "d", cache_dir=tmp_path / "c", mirror=srv.url
        )
        assert info.in_channels == 1 and info.resolution == 28 and info.num_classes == 10
        assert info.splits["train"] + info.splits["val"] == 30 and info.splits["test"] == 10
        assert len(info.mean) == 1
    # 28x28 one-channel storage is resized on the fly to a 32-pixel model's input.
    lo = build_loaders(info, input_size=32, style="cifar", batch_size=10, mode="memory")
    assert lo.in_channels == 1
    lo.train.set_epoch(0)
    x, _ = next(iter(lo.train))
    assert x.shape == (10, 1, 32, 32)
    assert next(iter(lo.test))[0].shape == (10, 1, 32, 32)


def test_prepare_download_false_without_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=False"):
        prepare_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "c", download=False)


def test_official_specs_come_from_torchvision() -> None:
    import torchvision.datasets as tvd

    assert get_source("cifar10").files[0].md5 == tvd.CIFAR10.tgz_md5
    assert get_source("FashionMNIST").name == "fashion-mnist"
    assert [f.filename for f in get_source("mnist").files] == [r[0] for r in tvd.MNIST.resources]


def test_image_folder_scans_leave_hidden_entries_out(tmp_path: Path) -> None:
    """`.ipynb_checkpoints/` is not a class and `._x.png` (macOS) or `.DS_Store` not an image,
    in the plan's torch-free count and in the data layer's scan alike."""
    from flows_helpers import tiny_dataset

    from cnn.data.sources import scan_imagefolder
    from tasks.plan import count_imagefolder

    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    clean = scan_imagefolder(data)
    for split in ("train", "val"):
        (data / split / ".ipynb_checkpoints").mkdir()
        (data / split / ".DS_Store").write_bytes(b"\0\1")
        for cls in clean.classes:
            (data / split / cls / "._0000.png").write_bytes(b"\0\5\x16\x07")
    scan = scan_imagefolder(data)
    assert scan.classes == clean.classes and scan.files == clean.files
    counts = count_imagefolder(data)
    assert sorted(counts.counts["train"]) == clean.classes
    assert sum(counts.counts["train"].values()) == len(clean.files["train"])


def test_image_extensions_are_torchvisions_plus_gif() -> None:
    """Written out in cnn/data/sources.py so that scanning a folder imports no torchvision."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from cnn.data.sources import IMAGE_EXTENSIONS

    assert tuple(sorted({*IMG_EXTENSIONS, ".gif"})) == IMAGE_EXTENSIONS


def test_sources_and_readers_load_on_first_use() -> None:
    from cnn.data import sources

    assert list(sources.SOURCES) == [d for d in sources.DATASETS if d != "imagefolder"]
    assert sources.CIFAR10Files.meta["md5"] is None  # the subclass that skips member md5s
    assert issubclass(sources.CIFAR100Files, __import__("torchvision").datasets.CIFAR100)
    with pytest.raises(AttributeError, match="NOPE"):
        sources.NOPE  # noqa: B018
