"""The MLflow server going away during training (issue 8, faults): the engine's tracker keeps
training going, says which logging calls failed and how to re-attach (the run id), and a
re-attached job fills in the missing points of the same run without duplicates. Real `mlflow
server` processes (infra/mlflow-server.sh) on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from servers import start_mlflow_server, stopping, wait_http_ok

from cnn.tracking import Tracker


@pytest.mark.slow
def test_server_gone_mid_training_is_reported_and_reattachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # calls under test only
    with stopping([start_mlflow_server(tmp_path)]) as servers:
        server = servers[0]
        wait_http_ok(server, f"{server.url}/health", timeout=180)
        c = mlflow.MlflowClient(server.url)
        run_id = c.create_run(c.create_experiment("faults")).info.run_id
        tracker = Tracker(run_id, server.url)
        tracker.log_params({"model": "lenet5", "lr": 0.1, "mirror": None})
        tracker.log_metrics({"val_accuracy": 0.5}, step=1)
        server.stop()  # the server goes away between epochs

        t0 = time.monotonic()
        tracker.log_metrics({"val_accuracy": 0.6}, step=2)  # fails, does not raise
        assert time.monotonic() - t0 < 60  # bounded: no minutes of HTTP retries per call
        assert tracker.offline
        t0 = time.monotonic()
        tracker.log_metrics({"val_accuracy": 0.7}, step=3)  # skipped at once
        tracker.set_tags({"note": "x"})
        assert time.monotonic() - t0 < 1
        report = tracker.failure_report()
        assert f"run {run_id} failed for 3 call(s)" in report
        assert "log_metrics step 2 (" in report and "log_metrics step 3 (skipped)" in report
        assert f"mlflow_run_id={run_id}" in report and "checkpoints" in report

    # Re-attach: the server is back (same store); the rerun job logs what was missing.
    with stopping([start_mlflow_server(tmp_path)]) as servers:
        server = servers[0]
        wait_http_ok(server, f"{server.url}/health", timeout=180)
        again = Tracker(run_id, server.url)
        for step, acc in ((1, 0.5), (2, 0.6), (3, 0.7)):  # the engine re-logs its history
            again.log_metrics({"val_accuracy": acc}, step=step)
        assert not again.failures
        history = mlflow.MlflowClient(server.url).get_metric_history(run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [1, 2, 3]
        params = mlflow.MlflowClient(server.url).get_run(run_id).data.params
        assert params == {"model": "lenet5", "lr": "0.1"}  # no "None" noise


def test_a_job_shorter_than_the_sampling_interval_still_records_system_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's monitor logs only after a full interval (5 s here); the closing sample makes a
    short job, or a short resumed attempt, visible in the run's system charts."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(uri)
    run_id = c.create_run(c.create_experiment("short")).info.run_id
    tracker = Tracker(run_id, uri)
    tracker.log_metrics({"val_accuracy": 0.5}, step=1)
    tracker.close()  # well inside the first interval
    metrics = c.get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), metrics
    assert metrics["val_accuracy"] == 0.5


@pytest.mark.parametrize(
    ("uri", "database"),
    [
        ("sqlite:///mlflow.db", "mlflow.db"),
        ("sqlite:////abs/dir/m.db?timeout=20", "/abs/dir/m.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite://", ""),
        ("http://127.0.0.1:5000", None),
        ("databricks", None),
    ],
)
def test_sqlite_database_is_parsed_once_for_all(uri: str, database: str | None) -> None:
    from cnn.tracking import sqlite_database
    from tasks.mlflow_utils import _sqlite_path

    assert sqlite_database(uri) == database
    want = Path(database) if database and database != ":memory:" else None
    assert _sqlite_path(uri) == want
