"""MLflow side (tasks/mlflow_utils.py) on a real SQLite store: fail-fast connectivity, the
self-contained model logging, champion alias logic and idempotent registration."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flows_helpers import log_and_register, tiny_classifier

from cnn.export import ImageClassifier
from tasks import mlflow_utils, registry


def _classifier() -> ImageClassifier:
    return tiny_classifier(["a", "b", "c"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_with_the_fix() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(mlflow_utils.TrackingUnavailableError, match=f"{uri} is unreachable"):
        mlflow_utils.check_tracking(uri)
    assert time.monotonic() - t0 < 6


def test_read_only_commands_do_not_create_a_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(mlflow_utils.TrackingUnavailableError, match="no MLflow store"):
        mlflow_utils.check_tracking(uri, create=False)
    assert not (tmp_path / "mlflow.db").exists()


def test_default_uri_is_sqlite_in_the_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert mlflow_utils.resolve_tracking_uri() == f"sqlite:///{tmp_path.as_posix()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert mlflow_utils.resolve_tracking_uri() == "http://example:5000"


def test_champion_moves_only_on_better_accuracy_and_retries_add_nothing(mlflow_store: str) -> None:
    import mlflow

    c = mlflow.MlflowClient(mlflow_store)
    model = _classifier()
    example = np.random.default_rng(0).integers(0, 256, (2, 3, 40, 40), dtype=np.uint8)
    runs = [mlflow_utils.start_run(f"r{i}", uri=mlflow_store) for i in range(3)]
    same_data = registry.DataIdentity("tiny", "0123abcd", ("a", "b", "c"), "test,n=30")

    def register(run: str, acc: float) -> registry.Registration:
        return log_and_register(mlflow_store, "lenet5-tiny", model, acc, identity=same_data,
                                run=run, example=example)  # fmt: skip

    first = register(runs[0], 0.50)
    assert (first.version, first.champion, first.reused) == ("1", True, False)
    assert "first champion" in first.reason
    worse = register(runs[1], 0.40)
    assert (worse.version, worse.champion) == ("2", False)
    assert "does not beat champion v1 (0.5000)" in worse.reason
    assert str(c.get_model_version_by_alias("lenet5-tiny", "champion").version) == "1"
    better = register(runs[2], 0.60)
    assert better.champion and "beats champion v1" in better.reason
    assert str(c.get_model_version_by_alias("lenet5-tiny", "champion").version) == "3"
    tags = c.get_model_version("lenet5-tiny", "2").tags
    assert tags["test_accuracy"] == "0.400000" and "alias unchanged" in tags["champion_decision"]

    # A retried register task (same run): no new logged model, no new version.
    again = register(runs[1], 0.40)
    assert (again.version, again.reused, again.champion) == ("2", True, False)
    assert len(c.search_model_versions("name = 'lenet5-tiny'")) == 3
    exp = c.get_run(runs[1]).info.experiment_id
    logged = c.search_logged_models(
        experiment_ids=[exp], filter_string=f"source_run_id = '{runs[1]}'"
    )
    assert len(logged) == 1


def test_logged_model_is_self_contained(mlflow_store: str) -> None:
    """The registered model takes raw uint8 images of any size and knows its classes; its
    signature says so; MLflow's generic pyfunc interface answers with class names
    (tests/test_serving.py loads it where cnnpipe is not installed)."""
    import mlflow

    model = _classifier()
    run = mlflow_utils.start_run("export", uri=mlflow_store)
    example = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    log_and_register(mlflow_store, "tiny", model, 0.1, run=run, example=example)
    loaded = mlflow_utils.load_model("models:/tiny@champion", mlflow_store)
    assert loaded.classes == ["a", "b", "c"] and loaded.input_size == 32
    big = torch.randint(0, 256, (1, 3, 57, 43), dtype=torch.uint8)
    torch.testing.assert_close(loaded(big), model(big))
    info = mlflow.models.get_model_info("models:/tiny@champion")
    spec = info.signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 3, -1, -1)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny@champion")
    out = pyfunc.predict(big.numpy())
    assert len(out) == 1 and out["label"][0] in ("a", "b", "c")
    assert abs(sum(out["probabilities"][0].values()) - 1.0) < 1e-5


def test_unknown_model_uri_is_a_clear_error(mlflow_store: str) -> None:
    with pytest.raises(ValueError, match="'models:/nope@champion' was not found"):
        mlflow_utils.load_model("models:/nope@champion", mlflow_store)


@pytest.mark.slow
def test_first_contact_with_a_new_store_is_race_free(tmp_path: Path) -> None:
    """Two processes creating the same new SQLite store at once: without the lock one of them
    fails in MLflow's schema migration ("duplicate column" / "table exists")."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import sys; from tasks.mlflow_utils import check_tracking; check_tracking(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri],
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors


def test_a_retried_flow_run_finds_its_run_and_refuses_a_changed_config(mlflow_store: str) -> None:
    """Keyed on the Prefect flow run id: a retry continues the same MLflow run; one whose
    config hash changed is refused with both hashes named, and the run is left as it was."""
    import mlflow

    c = mlflow.MlflowClient(mlflow_store)
    tags = {mlflow_utils.FLOW_RUN_TAG: "flow-run-1", mlflow_utils.FLOW_TAG: "train-pipeline",
            mlflow_utils.CONFIG_HASH_TAG: "aaaa1111", "output_dir": "/x/runs/r"}  # fmt: skip
    run_id = mlflow_utils.start_run("r", tags=tags, uri=mlflow_store)
    mlflow_utils.start_run("other", tags={**tags, mlflow_utils.FLOW_RUN_TAG: "x"}, uri=mlflow_store)
    mlflow_utils.end_run(run_id, "KILLED", uri=mlflow_store)
    assert mlflow_utils.find_flow_run_run("nope", "train-pipeline", uri=mlflow_store) is None
    assert mlflow_utils.find_flow_run_run("flow-run-1", "compare", uri=mlflow_store) is None
    found = mlflow_utils.find_flow_run_run("flow-run-1", "train-pipeline", uri=mlflow_store)
    assert found.info.run_id == run_id
    with pytest.raises(mlflow_utils.ConfigChangedError, match="aaaa1111.*bbbb2222"):
        mlflow_utils.reopen_run(found, "bbbb2222", uri=mlflow_store)
    assert c.get_run(run_id).info.status == "KILLED"  # untouched
    again = mlflow_utils.reopen_run(found, "aaaa1111", tags={"cnnpipe.pid": "7"}, uri=mlflow_store)
    assert again == run_id
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["cnnpipe.pid"] == "7"


def test_runs_carry_source_notes_and_params_without_none(mlflow_store: str) -> None:
    """What the compare parent run and every pipeline run show in the UI: source and git
    tags, the notes (description), params without `None` entries, a training experiment."""
    import mlflow

    run_id = mlflow_utils.start_run(
        "compare-cifar10", description="Comparison of a, b", uri=mlflow_store,
        params={"models": "lenet5,resnet18_cifar", "epochs": 3, "recipe": None},
    )  # fmt: skip
    c = mlflow.MlflowClient(mlflow_store)
    run = c.get_run(run_id)
    assert run.data.params == {"models": "lenet5,resnet18_cifar", "epochs": "3"}
    assert run.data.tags["mlflow.note.content"] == "Comparison of a, b"
    assert run.data.tags["mlflow.source.name"] == "cnnpipe"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40  # this checkout's commit
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
