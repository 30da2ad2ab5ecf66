"""Helpers shared by the flow/CLI/MLflow tests: a tiny learnable dataset, a pre-migrated MLflow
SQLite store to copy (creating one costs seconds; `conftest.mlflow_store` uses it), running
`cnnpipe` as a real process, and a tiny classifier logged and registered as the register task
does."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fakedata import make_imagefolder

if TYPE_CHECKING:
    from cnn.export import ImageClassifier
    from tasks.registry import DataIdentity, Registration

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ants", "bees", "wasps")


def tiny_dataset(root: Path, n_train: int = 30, n_val: int = 10) -> Path:
    """train/ and val/ folders of 32x32 learnable images, 3 classes."""
    return make_imagefolder(root, classes=CLASSES, n_train=n_train, n_val=n_val, size=32)


def mlflow_template(base: Path) -> Path:
    """A migrated, empty mlflow.db under `base` (built once per test session, under a lock)."""
    db = base / "mlflow-template" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            tmp = db.with_suffix(".tmp.db")
            subprocess.run(
                [sys.executable, "-c",
                 "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                 f"sqlite:///{tmp}"],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            os.replace(tmp, db)
    return db


def copy_store(template: Path, workdir: Path) -> str:
    """Put a copy of the template store in `workdir`; return its tracking URI."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, workdir / "mlflow.db")
    return f"sqlite:///{(workdir / 'mlflow.db').as_posix()}"


def cli_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """Environment of a `cnnpipe` process: the embedded defaults (no servers configured), a
    test-owned PREFECT_HOME shared across the session (its DB is migrated once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def cnnpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cnnpipe(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def parse_json_stdout(proc: subprocess.CompletedProcess[str]) -> Any:
    """stdout must be exactly one JSON document (everything else belongs on stderr)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def mlflow_counts(uri: str) -> dict[str, int]:
    """Runs and model versions in a store (reads it in a subprocess-free way)."""
    import mlflow

    c = mlflow.MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps) if exps else []
    versions = c.search_model_versions()
    return {"runs": len(runs), "versions": len(versions)}


def tiny_classifier(
    classes: list[str], name: str = "lenet5", pretrained: str | None = None
) -> ImageClassifier:
    """An untrained (seeded) classifier of the registry's `name` with its own preprocessing."""
    import torch

    from cnn.export import ImageClassifier
    from cnn.models import get_model, model_info

    torch.manual_seed(0)
    info = model_info(name)
    net = get_model(name, num_classes=len(classes), pretrained=pretrained)
    return ImageClassifier(
        net, classes=classes, input_size=info.input_size, resize_size=info.resize_size,
        mean=info.mean, std=info.std, info={"model": name},
    )  # fmt: skip


def log_and_register(
    store: str,
    name: str,
    clf: ImageClassifier,
    accuracy: float = 0.5,
    *,
    identity: DataIdentity | None = None,
    run: str | None = None,
    example: Any = None,
) -> Registration:
    """Log `clf` to `run` (a new run by default) and register it as a version of `name`, as
    the register task does."""
    import numpy as np

    from tasks import mlflow_utils, registry

    run = run or mlflow_utils.start_run(f"{name}-{accuracy}", uri=store)
    if example is None:
        example = np.random.default_rng(0).integers(0, 256, (1, 3, 40, 36), dtype=np.uint8)
    model_uri = mlflow_utils.log_model(run, clf, example, uri=store)
    return registry.register(
        model_uri, name=name, run_id=run, test_accuracy=accuracy, identity=identity, uri=store
    )


@contextlib.contextmanager
def prefect_harness(home: Path, **env: str) -> Iterator[None]:
    """A temporary Prefect server (Prefect's test harness) with PREFECT_HOME (results, caches)
    in `home` and `env` set while it runs; the environment is restored afterwards."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cmdline(pid: int) -> str:
    """A process's command line ("" once it is gone), read from /proc."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (from /proc, not from the code under test)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
