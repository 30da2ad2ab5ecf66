"""MLflow 3's model-centric features and a readable UI (issue 8, items 3, 4, 5 and 7), on one real
`train_pipeline` flow run: temporary Prefect server, real torchrun (gloo, CPU), real MLflow
SQLite store. Tiny learnable images keep the job short."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flows_helpers import copy_store, mlflow_template, prefect_harness, tiny_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server; PREFECT_HOME (results, caches) in a temp dir. System
    metrics sampled every second, so a few-second job records some."""
    home = tmp_path_factory.mktemp("prefect_home")
    with prefect_harness(home, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"):
        yield


@pytest.fixture(scope="module")
def pipeline_run(
    harness: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], str, Path]:
    """One real flow run, which also exercises item 5: the training job dies in epoch 2
    (SIGKILL of rank 0 after step 7, no task retry), so the flow run fails; Prefect retries the
    flow run (same flow run id), which must find its MLflow run and output directory, resume
    from checkpoints/last.pt and register one version."""
    import threading

    from flows.pipeline import train_pipeline
    from tasks.request import TrainRequest

    work = tmp_path_factory.mktemp("features")
    uri = copy_store(mlflow_template(tmp_path_factory.getbasetemp()), work)
    data = tiny_dataset(work / "bugs")  # 90 training images: 5 steps of 16 per epoch
    os.environ.update(CNNPIPE_TEST_KILL_AT_STEP="7", CNNPIPE_TEST_KILL_RANK="0")
    done = threading.Event()

    def disarm() -> None:  # the first job already has the kill switch; the retry must not
        while not done.is_set():
            if list(work.glob("runs/*/checkpoints/last.pt")):
                os.environ.pop("CNNPIPE_TEST_KILL_AT_STEP", None)
                return
            time.sleep(0.05)

    threading.Thread(target=disarm, daemon=True).start()
    cwd = Path.cwd()
    os.chdir(work)  # runs/ and mlruns/ land here
    try:
        flow = train_pipeline.with_options(retries=1, retry_delay_seconds=1)
        result = flow(
            TrainRequest(
                model="lenet5", dataset="imagefolder", data_dir=str(data), epochs=3,
                batch_size=16, device="cpu", tracking_uri=uri, train_retries=0,
            )
        )  # fmt: skip
    finally:
        done.set()
        os.chdir(cwd)
        for key in ("CNNPIPE_TEST_KILL_AT_STEP", "CNNPIPE_TEST_KILL_RANK"):
            os.environ.pop(key, None)
    return result, uri, work


def test_run_is_readable_in_the_ui(pipeline_run: tuple[dict[str, Any], str, Path]) -> None:
    import mlflow

    result, uri, work = pipeline_run
    c = mlflow.MlflowClient(uri)
    run = c.get_run(result["run_id"])
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "lenet5-bugs"
    note = run.data.tags["mlflow.note.content"]
    assert "lenet5 on bugs (3 classes)" in note and "recipe" in note and "3 epochs" in note
    assert run.data.tags["mlflow.source.name"] == "cnnpipe"
    assert len(run.data.tags.get("mlflow.source.git.commit", "")) == 40
    params = run.data.params
    assert params["model.name"] == "lenet5" and params["optim.epochs"] == "3"
    assert "None" not in params.values()  # unset options are left out, not logged as "None"
    files = {a.path for a in c.list_artifacts(run.info.run_id, "run")}
    assert {"run/run.yaml", "run/result.json", "run/train.log"} <= files
    log = Path(c.download_artifacts(run.info.run_id, "run/train.log", str(work))).read_text()
    assert "test accuracy" in log and "launching" in log  # the job's own output, streamed
    assert "resumed from" in log  # both attempts, appended
    # The dataset is the run's input: name, digest, source folder and split sizes.
    (ds_input,) = run.inputs.dataset_inputs
    ds = ds_input.dataset
    assert ds.name == "bugs" and json.loads(ds.source)["uri"] == str((work / "bugs").resolve())
    assert json.loads(ds.profile)["splits"]["train"] > 0
    # System metrics from rank 0 went into the same run.
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), run.data.metrics


def test_logged_model_carries_test_metrics(pipeline_run: tuple[dict[str, Any], str, Path]) -> None:
    import mlflow

    result, uri, _ = pipeline_run
    mlflow.set_tracking_uri(uri)
    assert result["model_name"] == "lenet5-bugs" and result["champion"]
    run = mlflow.get_run(result["run_id"])
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        order_by=[{"field_name": "metrics.test_accuracy", "ascending": False}],
        output_format="list",
    )
    assert [m.model_id for m in models] == [result["model_uri"].removeprefix("models:/")]
    metrics = {m.key: m for m in models[0].metrics}
    assert metrics["test_accuracy"].value == pytest.approx(result["metrics"]["test_accuracy"])
    assert metrics["test_accuracy"].dataset_name == "bugs"


def test_prefect_side(pipeline_run: tuple[dict[str, Any], str, Path]) -> None:
    """Flow run named and tagged by model and dataset, a link artifact to the MLflow run, and
    a `cnnpipe.champion.moved` event for the first champion."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result, _, _ = pipeline_run
    with get_client(sync_client=True) as client:
        (flow_run,) = [r for r in client.read_flow_runs() if r.name == "lenet5-imagefolder"]
        assert {"model:lenet5", "dataset:bugs"} <= set(flow_run.tags)
        links = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mlflow-run-lenet5-bugs"]))
        )
        assert links and result["run_id"] in str(links[0].data)
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30  # events reach the store in batches
        while not events and time.monotonic() < deadline:
            resp = client.request(
                "POST", "/events/filter",
                json={"filter": {"event": {"name": ["cnnpipe.champion.moved"]}}, "limit": 10},
            )  # fmt: skip
            events = resp.json()["events"]
            time.sleep(0.5)
    assert events, "no champion event"
    assert events[0]["payload"]["name"] == "lenet5-bugs"
    assert events[0]["payload"]["version"] == result["model_version"]


def test_host_gpu_limit_queues_flow_runs(harness: None) -> None:
    """Two holders of the host's GPU slots (two flow runs' training phases) with one slot:
    the second waits until the first releases (Prefect global concurrency limit)."""
    import threading

    from tasks import gpu_limit

    name = gpu_limit.limit_name("test-host")
    assert name == "gpus-test-host"
    assert gpu_limit.ensure_limit(1, name=name) == 1
    assert gpu_limit.ensure_limit(4, name=name) == 1  # exists: kept unless update=True
    assert gpu_limit.ensure_limit(1, name=name, update=True) == 1
    spans: dict[str, tuple[float, float]] = {}

    def job(label: str) -> None:
        with gpu_limit.host_gpus(1, name=name) as held:
            assert held == 1
            start = time.monotonic()
            time.sleep(1.5)
            spans[label] = (start, time.monotonic())

    threads = [threading.Thread(target=job, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    (a0, a1), (b0, b1) = sorted(spans.values())
    assert b0 >= a1 - 0.05, spans  # no overlap: the second holder queued
    with gpu_limit.host_gpus(0, name=name) as held:  # CPU jobs hold nothing
        assert held == 0
    # More GPUs than the limit: holds what there is instead of waiting forever.
    with gpu_limit.host_gpus(8, name=name, timeout_seconds=30) as held:
        assert held == 1


def test_a_retried_flow_run_resumes_in_its_own_mlflow_run(
    pipeline_run: tuple[dict[str, Any], str, Path],
) -> None:
    import mlflow
    from prefect.client.orchestration import get_client

    result, uri, _ = pipeline_run
    assert result["resumed_from"] and result["resumed_from"].endswith("last.pt")
    assert result["epochs_completed"] == 3
    c = mlflow.MlflowClient(uri)
    run = c.get_run(result["run_id"])
    runs = c.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # one MLflow run
    assert run.info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(result["run_id"], "val_accuracy")]
    assert sorted(steps) == [1, 2, 3]  # no duplicated epochs
    assert len(c.search_model_versions("name = 'lenet5-bugs'")) == 1  # one version
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run.data.tags["prefect.flow_run_id"])
    assert flow_run.run_count == 2 and flow_run.state.is_completed()
