"""Issue 10, item 1: everything checkable is checked in the plan step, before Prefect, MLflow or
torchrun start. Each case feeds the real bad input to the real CLI and asserts exit code 2 (1 for
an offline download), one line naming the problem and the fix, a time bound, and that nothing
was written: no MLflow store, no run folder, no tensor cache, no folder the user did not ask for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flows_helpers import REPO, tiny_dataset

from flows.cli import main
from tasks.plan import host_resolves

TRAIN = ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data",
         "--batch-size", "4"]  # fmt: skip


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path, code: int = 2) -> str:
    """Run the CLI in-process; check exit code, one line, CPU-time bound, nothing written."""
    before = _snapshot(root)
    t0 = time.process_time()
    got = main(argv)
    seconds = time.process_time() - t0
    out, err = capsys.readouterr()
    assert got == code, err
    assert out == ""
    assert err.startswith(f"cnnpipe {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert seconds < 20
    assert _snapshot(root) == before, "the check wrote something"
    return err


def test_pretrained_file_missing(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails([*TRAIN, "--pretrained", "weights/nothere.pth"], capsys, workdir)
    assert "nothere.pth" in err and "does not exist" in err


def test_pretrained_file_of_random_bytes(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "junk.pth").write_bytes(os.urandom(4096))
    err = _fails([*TRAIN, "--pretrained", "junk.pth"], capsys, workdir)
    assert "junk.pth" in err and "weights_only=True" in err
    assert "Re-running" not in err  # PyTorch's advice to retry unsafely is not passed on


def test_pretrained_file_for_another_architecture(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cnn.models import get_model

    torch.save(get_model("lenet5", num_classes=3).state_dict(), workdir / "lenet.pth")
    argv = ["train", "--model", "alexnet_cifar", "--dataset", "imagefolder", "--data-dir", "data",
            "--batch-size", "4", "--pretrained", "lenet.pth"]  # fmt: skip
    err = _fails(argv, capsys, workdir)
    assert "does not fit model 'alexnet_cifar'" in err and "missing keys" in err


def test_pretrained_weights_name_offline(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if host_resolves("download.pytorch.org"):
        pytest.skip("this machine resolves download.pytorch.org (online)")
    argv = ["train", "--model", "mobilenet_v2", "--dataset", "imagefolder", "--data-dir", "data",
            "--batch-size", "4", "--pretrained", "DEFAULT"]  # fmt: skip
    err = _fails(argv, capsys, workdir)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    assert str(hub) in err and "--pretrained PATH" in err


def test_one_class_only(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in ("train", "val"):
        for cls in ("bees", "wasps"):
            for f in (workdir / "data" / split / cls).iterdir():
                f.unlink()
            (workdir / "data" / split / cls).rmdir()
    err = _fails(TRAIN, capsys, workdir)
    assert "at least 2" in err and "'ants'" in err


def test_empty_class_folder(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for f in (workdir / "data" / "val" / "wasps").iterdir():
        f.unlink()
    err = _fails(TRAIN, capsys, workdir)
    assert "val/wasps has no images" in err


def test_batch_larger_than_the_training_split(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fails([*TRAIN, "--batch-size", "64"], capsys, workdir)
    assert "batch_size=64" in err and "12 images" in err and "--batch-size 12" in err


def test_data_dir_is_a_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "archive.tar.gz").write_bytes(b"not a folder")
    argv = ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir",
            "archive.tar.gz"]  # fmt: skip
    err = _fails(argv, capsys, workdir)
    assert "is a file, not a directory" in err and "tar -xzf" in err


def test_output_dir_is_a_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "out").write_text("a file")
    err = _fails([*TRAIN, "--output-dir", "out"], capsys, workdir)
    assert "--output-dir out is a file" in err
    err = _fails([*TRAIN, "--output-dir", "out/run1"], capsys, workdir)
    assert "cannot be created" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_not_writable(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "ro").mkdir(mode=0o555)
    err = _fails([*TRAIN, "--output-dir", "ro/run"], capsys, workdir)
    assert "not writable" in err


def test_mlflow_sqlite_folder_missing_is_not_created(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = workdir / "nonexistent" / "dir"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}/mlflow.db")
    err = _fails(TRAIN, capsys, workdir)
    assert f"folder {missing} does not exist" in err
    assert not (workdir / "nonexistent").exists()


def test_yaml_parse_error_names_file_line_column(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "bad.yaml").write_text("optim:\n  lr: [0.1, 0.2\n  batch_size: 4\n")
    argv = ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data",
            "--config", "bad.yaml"]  # fmt: skip
    err = _fails(argv, capsys, workdir)
    assert "bad.yaml:3:" in err and "invalid YAML" in err


def test_evaluate_test_split_of_a_folder_without_one(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--model-uri", "models:/x@champion", "--dataset", "imagefolder",
            "--data-dir", "data", "--split", "test"]  # fmt: skip
    err = _fails(argv, capsys, workdir)
    assert "no test/ split" in err and "--split val" in err


def _cli(
    args: list[str], cwd: Path, timeout: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PYTHONPATH"] = str(REPO)
    env.pop("CNNPIPE_DATA_MIRROR", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_offline_download_fails_fast_with_the_offline_route(tmp_path: Path, command: str) -> None:
    """Item 7: the README's first command, offline: no retries of a DNS failure, < 15 s, and
    the error shows the route that works offline. A real process, as a user runs it."""
    # A generous timeout: a slow first lookup must not look "offline" here while the CLI's
    # own (cached) lookup succeeds and starts a real download.
    if host_resolves("www.cs.toronto.edu", timeout=30):
        pytest.skip("this machine resolves www.cs.toronto.edu (online)")
    args = [command, "--dataset", "cifar10", "--data-dir", "data"]
    if command == "train":
        args[1:1] = ["--model", "lenet5"]
    proc, wall = _cli(args, tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cnnpipe {command}: error: cannot download cifar10"), last
    assert "--dataset imagefolder --data-dir" in last
    assert "Traceback" not in proc.stderr
    assert wall < 15 + 10  # 15 s bound, plus process start-up on a loaded 2-core machine
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        ([*TRAIN, "--output-dir", "/proc/cnnpipe-out"], "--output-dir /proc/cnnpipe-out"),
        ([*TRAIN, "--cache-dir", "/proc/cnnpipe-cache"], "--cache-dir /proc/cnnpipe-cache"),
        (["prepare", "--dataset", "imagefolder", "--data-dir", "data", "--cache-dir",
          "/proc/cnnpipe-cache"], "--cache-dir /proc/cnnpipe-cache"),
    ],
)  # fmt: skip
def test_a_folder_the_file_system_refuses(
    workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    """/proc refuses new folders even to root, whom os.access lets write anywhere: the plan
    asks the file system itself, before any flow or MLflow run exists."""
    err = _fails(argv, capsys, workdir)
    assert f"{flag} cannot be created in /proc" in err and "in a folder you can write to" in err
    assert not (workdir / "data" / "cache").exists()


def _refused_url() -> str:
    import socket

    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


@pytest.mark.parametrize("command", ["train", "predict"])
def test_unreachable_prefect_api(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:  # fmt: skip
    """A configured Prefect server that does not answer fails before anything runs (predict
    runs as a flow when PREFECT_API_URL is set), instead of Prefect's traceback."""
    url = _refused_url()
    monkeypatch.setenv("PREFECT_API_URL", url)
    image = next((workdir / "data" / "train").rglob("*.png"))
    argv = TRAIN if command == "train" else ["predict", "--model-uri", "models:/x@champion",
                                             str(image)]  # fmt: skip
    err = _fails(argv, capsys, workdir)
    assert f"Prefect API {url} is unreachable" in err and "unset PREFECT_API_URL" in err


def test_evaluate_without_a_test_split_fails_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The "no test split, evaluating val" note comes after the model loads: a failing
    evaluate still ends with its one error line."""
    argv = ["evaluate", "--model-uri", "models:/x@champion", "--dataset", "imagefolder",
            "--data-dir", "data"]  # fmt: skip
    err = _fails(argv, capsys, workdir)
    assert "no MLflow store" in err


def test_prefect_api_url_that_is_not_a_url(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "localhost4200")
    err = _fails(TRAIN, capsys, workdir)
    assert "PREFECT_API_URL='localhost4200' is not a URL" in err and "http://" in err


def test_unreadable_image_met_inside_the_flow(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Bad images are found by prepare, inside the flow: still exit 2, the last line names
    the file and the fix, no traceback (Prefect's flow-failure log loses it), and nothing of
    the run is written: no MLflow store (it is created with the run, after prepare), no cache,
    no run folder. A real `cnnpipe` process on the embedded Prefect API."""
    from flows_helpers import cli_env

    tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    bad = tmp_path / "data" / "train" / "ants" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)
    before = _snapshot(tmp_path)
    env = cli_env(tmp_path_factory.getbasetemp() / "prefect-home")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *TRAIN, "--epochs", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnpipe train: error: 1 unreadable image(s)"), last
    assert "broken.jpg" in last and "--skip-bad-images" in last
    assert "Traceback" not in proc.stderr
    assert _snapshot(tmp_path) == before


def test_no_image_left_to_validate_on(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No val/ and one image per class: the 10% hold-out takes none, so nothing would
    validate (the run would end without a best checkpoint). Said in the plan."""
    import shutil

    data = workdir / "data"
    shutil.rmtree(data / "val")
    for cls in (data / "train").iterdir():
        for extra in sorted(cls.iterdir())[1:]:
            extra.unlink()
    err = _fails([*TRAIN, "--batch-size", "2"], capsys, workdir)
    assert "no val/ folder" in err and "single image" in err and "val/<class>/<image>" in err


@pytest.mark.parametrize("uri", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_mlflow_store(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    """Each process would get its own empty database: the job could not find the flow's run
    (it failed after training started). Refused in the plan."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    err = _fails(TRAIN, capsys, workdir)
    assert f"MLflow store {uri} is an in-memory database" in err and "sqlite:///mlflow.db" in err
