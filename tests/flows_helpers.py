"""Helpers shared by the flow/CLI/MLflow tests: a tiny learnable dataset, a pre-migrated MLflow
SQLite store to copy (creating one costs seconds), and running `cnnpipe` as a real process."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from fakedata import make_imagefolder

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
