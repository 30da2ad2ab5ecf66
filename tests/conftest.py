"""Shared pytest fixtures: the `data` marker's skip logic and paths to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CNNPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `data` cleanly when ../shared/data is absent."""
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs real data in {SHARED_DATA} (absent)")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real development data (see its SOURCES.md)."""
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep tests away from the user's MLflow store and torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture()
def mlflow_store(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A fresh SQLite MLflow store (a copy of the migrated template: migrating costs seconds),
    made the process default; its artifacts (./mlruns) land in tmp_path."""
    from flows_helpers import copy_store, mlflow_template

    from tasks import mlflow_utils

    monkeypatch.chdir(tmp_path)
    uri = copy_store(mlflow_template(tmp_path_factory.getbasetemp()), tmp_path)
    return mlflow_utils.check_tracking(uri)
