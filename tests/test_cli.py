"""`cnnpipe` bad input: each case exits non-zero within seconds, with one line naming the
problem, before Prefect starts and without writing anything to MLflow."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flows_helpers import copy_store, mlflow_counts, mlflow_template, tiny_dataset

from flows.cli import build_parser, main


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    """Run the CLI in-process; returns (exit code, stderr, CPU seconds). CPU time, not wall
    time, is what the "within seconds" check bounds: the shared test machine may be loaded."""
    t0 = time.process_time()
    code = main(argv)
    out, err = capsys.readouterr()
    assert out == "", "bad input must not print to stdout"
    return code, err, time.process_time() - t0


TRAIN = ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--model", "lenet6", "--dataset", "imagefolder", "--data-dir", "data"],
         "lenet6"),
        (["train", "--model", "lenet5", "--dataset", "cifar11"], "cifar11"),
        (["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "nowhere"],
         "nowhere"),
        ([*TRAIN, "--set", "epochs=abc"], "epochs='abc'"),
        ([*TRAIN, "--set", "lr_max=0.1"], "'lr_max'"),
        ([*TRAIN, "--set", "justtext"], "'justtext' is not key=value"),
        ([*TRAIN, "--epochs", "0"], "epochs=0"),
        ([*TRAIN, "--recipe", "nosuchrecipe"], "nosuchrecipe"),
        ([*TRAIN, "--nnodes", "2"], "--rdzv-endpoint"),
        ([*TRAIN, "--config", "missing.yaml"], "missing.yaml"),
        (["compare", "--models", "lenet5,vgg99", "--dataset", "imagefolder", "--data-dir", "data"],
         "vgg99"),
        (["evaluate", "--model-uri", "models:/x@champion", "--dataset", "imagefolder",
          "--data-dir", "data", "--split", "holdout"], "'holdout'"),
        (["predict", "--model-uri", "not-a-uri", "data/val/ants"], "'not-a-uri' is not a URI"),
        (["predict", "--model-uri", "models:/x@champion", "--topk", "0", "data"], "--topk 0"),
        (["predict", "--model-uri", "models:/x@champion", "missing.png"], "missing.png"),
    ],
)  # fmt: skip
def test_bad_input_is_named_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, err, seconds = _run(argv, capsys)
    assert code == 2, err
    assert needle in err, err
    assert err.startswith(f"cnnpipe {argv[0]}: error: ") and err.count("\n") == 1
    assert seconds < 20
    assert not (workdir / "mlflow.db").exists() and not (workdir / "runs").exists()


def test_an_image_file_that_is_not_an_image(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "fake.jpg").write_text("definitely not a JPEG")
    code, err, _ = _run(["predict", "--model-uri", "models:/x@champion", "fake.jpg"], capsys)
    assert code == 2 and "fake.jpg is not a readable image" in err
    assert not (workdir / "mlflow.db").exists()


def test_model_uri_that_does_not_exist(
    workdir: Path, capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = next((workdir / "data" / "val" / "ants").iterdir())
    # No store here at all: a clear error, and no empty mlflow.db left behind.
    code, err, _ = _run(["predict", "--model-uri", "models:/ghost@champion", str(image)], capsys)
    assert code == 2 and "no MLflow store" in err
    assert not (workdir / "mlflow.db").exists()
    # A store without that model: the URI is named; nothing is added to the store.
    uri = copy_store(mlflow_template(tmp_path_factory.getbasetemp()), workdir)
    before = mlflow_counts(uri)
    for argv in (
        ["predict", "--model-uri", "models:/ghost@champion", str(image)],
        ["evaluate", "--model-uri", "models:/ghost@champion", "--dataset", "imagefolder",
         "--data-dir", "data"],
    ):  # fmt: skip
        code, err, seconds = _run(argv, capsys)
        assert code == 2 and "'models:/ghost@champion' was not found" in err, err
        assert seconds < 20
    assert mlflow_counts(uri) == before


def test_unreachable_mlflow_fails_before_training(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    code, err, seconds = _run([*TRAIN, "--epochs", "1", "--batch-size", "2", "--json"], capsys)
    assert code == 2 and f"http://127.0.0.1:{port} is unreachable" in err, err
    assert seconds < 20
    assert not (workdir / "runs").exists()  # no training job was started


def test_parser_knows_every_command() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"models", "prepare", "train", "compare", "evaluate", "predict"} <= set(sub.choices)
    args = build_parser().parse_args([*TRAIN, "--pretrained", "--set", "a=1", "--set", "b=2"])
    assert args.pretrained == "DEFAULT" and args.set == ["a=1", "b=2"]


@pytest.mark.slow  # the download's real retry backoff takes ~15 s
def test_failed_download_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """As a user sees it (a real process, so no other test's logging handlers interfere)."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CNNPIPE_DATA_MIRROR": f"http://127.0.0.1:{port}/"}
    cmd = [sys.executable, "-m", "flows.cli", "prepare", "--dataset", "cifar10"]
    proc = subprocess.run(
        [*cmd, "--data-dir", str(tmp_path / "data")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnpipe prepare: error:") and "cifar-10-python.tar.gz" in last
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "data").rglob("*.tar.gz"))  # no partial file left behind
