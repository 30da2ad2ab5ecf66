"""The pipeline end to end, as users run it: real `cnnpipe` processes on the embedded defaults
(Prefect's ephemeral API, `sqlite:///mlflow.db` in the working dir), real torchrun with gloo on
CPU, real MLflow. Tiny learnable images (32x32, 3 classes, lenet5) keep each job short."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from flows_helpers import (
    CLASSES,
    alive,
    cli_env,
    cmdline,
    cnnpipe,
    copy_store,
    mlflow_counts,
    mlflow_template,
    parse_json_stdout,
    run_cli,
    tiny_dataset,
)

pytestmark = pytest.mark.slow

TRAIN = ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", "data",
         "--batch-size", "16", "--device", "cpu", "--register-as", "lenet5-tiny"]  # fmt: skip


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect_home")


def _workdir(base: Path, template_base: Path) -> tuple[Path, str]:
    tiny_dataset(base / "data")
    return base, copy_store(mlflow_template(template_base), base)


@pytest.fixture(scope="module")
def two_runs(
    tmp_path_factory: pytest.TempPathFactory, prefect_home: Path
) -> tuple[Path, str, list[dict[str, Any]], list[str]]:
    """Two `cnnpipe train --json` pipelines started at the same moment in the same folder:
    same MLflow SQLite file, same Prefect home, each with its own torchrun rendezvous.

    The first one also has its training job killed: its rank 1 is SIGKILLed at the first step
    of epoch 2 (engine test hook; torchrun --max-restarts 0, so the job fails), and Prefect's
    retry must resume from epoch 1's checkpoint in the same output dir and MLflow run."""
    work, uri = _workdir(tmp_path_factory.mktemp("two"), tmp_path_factory.getbasetemp())
    steps_per_epoch = 90 // 16
    killed = cli_env(prefect_home, CNNPIPE_TEST_KILL_AT_STEP=str(steps_per_epoch + 1))
    argv = [
        [*TRAIN, "--epochs", "2", "--nproc-per-node", "2", "--retries", "1", "--json"],
        [*TRAIN, "--epochs", "2", "--json"],
    ]
    procs = [
        subprocess.Popen(
            cnnpipe(*a), cwd=work, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for a, e in zip(argv, (killed, cli_env(prefect_home)), strict=True)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(out))
    return work, uri, results, [err for _, err in outs]


def test_two_pipelines_at_once_both_finish(two_runs: Any) -> None:
    work, uri, results, stderrs = two_runs
    for err in stderrs:
        assert "database is locked" not in err
        assert "EADDRINUSE" not in err and "address already in use" not in err.lower()
    assert results[0]["run_id"] != results[1]["run_id"]
    assert sorted(r["model_version"] for r in results) == ["1", "2"]
    # The killed-and-retried pipeline added no second MLflow run and no second version.
    assert mlflow_counts(uri) == {"runs": 2, "versions": 2}
    # Exactly one champion; the later version is crowned only if it is strictly better.
    import mlflow

    c = mlflow.MlflowClient(uri)
    champ = c.get_model_version_by_alias("lenet5-tiny", "champion")
    by_version = {r["model_version"]: r for r in results}
    acc = {v: r["metrics"]["test_accuracy"] for v, r in by_version.items()}
    expected = "2" if acc["2"] > acc["1"] else "1"
    assert str(champ.version) == expected
    assert by_version[expected]["champion"] is True


def test_retry_after_a_killed_job_resumes_without_duplicates(two_runs: Any) -> None:
    _, uri, results, stderrs = two_runs
    r = results[0]
    assert r["resumed_from"] and r["resumed_from"].endswith("last.pt"), stderrs[0][-3000:]
    assert r["epochs_completed"] == 2 and results[1]["resumed_from"] is None
    assert "Retry" in stderrs[0] or "retry" in stderrs[0].lower()
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(r["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]  # the same run, no duplicated epochs


def test_train_json_contract(two_runs: Any) -> None:
    for r in two_runs[2]:
        assert {"run_id", "model_name", "model_version", "champion", "metrics", "timings",
                "images_per_s"} <= set(r)  # fmt: skip
        assert r["model_name"] == "lenet5-tiny" and isinstance(r["champion"], bool)
        m = r["metrics"]
        assert {"test_accuracy", "val_accuracy", "per_class_accuracy"} <= set(m)
        assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["val_accuracy"] <= 1.0
        assert set(m["per_class_accuracy"]) == set(CLASSES)
        assert all(0.0 <= a <= 1.0 for a in m["per_class_accuracy"].values())
        assert r["images_per_s"] > 0
        t = r["timings"]
        for stage in ("startup", "prepare", "train", "train_job", "evaluate", "register", "total"):
            assert t[stage] >= 0, stage
        assert t["train_job"] <= t["train"] <= t["total"]


def test_one_mlflow_run_holds_everything(two_runs: Any) -> None:
    import mlflow

    _, uri, results, _ = two_runs
    c = mlflow.MlflowClient(uri)
    r = results[1]
    run = c.get_run(r["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params  # `section.key` names
    assert params["model.name"] == "lenet5" and params["optim.batch_size"] == "16"
    assert {"val_accuracy", "train_loss", "test_accuracy"} <= set(run.data.metrics)
    assert run.data.tags["registered_model"] == f"lenet5-tiny/{r['model_version']}"
    files = {a.path for a in c.list_artifacts(r["run_id"], "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/sample_predictions.png",
            "evaluation/per_class_accuracy.json"} <= files  # fmt: skip
    version = c.get_model_version("lenet5-tiny", r["model_version"])
    assert version.run_id == r["run_id"] and "champion_decision" in version.tags


def test_evaluate_and_predict_with_the_champion(two_runs: Any, prefect_home: Path) -> None:
    work, uri, results, _ = two_runs
    env = cli_env(prefect_home)
    champ = next(r for r in results if r["champion"])
    before = mlflow_counts(uri)
    commands = [
        ["evaluate", "--model-uri", "models:/lenet5-tiny@champion", "--dataset", "imagefolder",
         "--data-dir", "data", "--split", "val", "--json"],
        ["predict", "--model-uri", "models:/lenet5-tiny@champion", "data/val/ants", "--topk",
         "2", "--json"],
    ]  # fmt: skip
    procs = [  # both at once: they only read the store
        subprocess.Popen(
            cnnpipe(*c),
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for c in commands
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ev, pred = (json.loads(out) for out, _ in outs)

    assert ev["model_uri"] == "models:/lenet5-tiny@champion" and ev["split"] == "val"
    assert set(ev["metrics"]["per_class_accuracy"]) == set(CLASSES)
    # The logged model's own preprocessing reproduces the training job's evaluation.
    assert ev["metrics"]["accuracy"] == pytest.approx(champ["metrics"]["test_accuracy"], abs=1e-6)

    assert len(pred) == 10
    for item in pred:
        assert Path(item["path"]).parent.name == "ants"
        probs = [p["probability"] for p in item["predictions"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {p["label"] for p in item["predictions"]} <= set(CLASSES)
    assert mlflow_counts(uri) == before  # evaluation and prediction write nothing to MLflow


def _tree(pid: int) -> list[int]:
    from tasks.launch import process_tree

    return process_tree(pid)


def test_cancelled_pipeline_leaves_no_process_behind(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, prefect_home: Path
) -> None:
    """SIGTERM to `cnnpipe train` (what a Prefect process worker sends on cancellation) while
    the training workers run: torchrun, its workers and their children all go."""
    work, uri = _workdir(tmp_path, tmp_path_factory.getbasetemp())
    log = tmp_path / "cnnpipe.log"  # a file, not a pipe: an unread pipe would fill and block
    with log.open("w") as err:
        proc = subprocess.Popen(cnnpipe(*TRAIN, "--epochs", "500", "--retries", "0"), cwd=work,
                                env=cli_env(prefect_home), stdout=subprocess.DEVNULL,
                                stderr=err, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        workers: list[int] = []
        while not workers:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training workers never started"
            time.sleep(0.5)
            workers = [p for p in _tree(proc.pid) if "-u -m cnn.train" in cmdline(p)]
        time.sleep(1.0)
        job = [p for p in _tree(proc.pid) if p != proc.pid and "prefect" not in cmdline(p)]
        assert any("torch.distributed.run" in cmdline(p) for p in job)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        deadline = time.monotonic() + 20
        while any(alive(p) for p in job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in job if alive(p)], "orphaned training processes"
        leftovers = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                     if str(work) in cmdline(p) and alive(p)]  # fmt: skip
        assert not leftovers, [(p, cmdline(p)) for p in leftovers]
        import mlflow

        runs = mlflow.MlflowClient(uri).search_runs(["0", "1"])
        assert [r.info.status for r in runs] in ([], ["KILLED"], ["FAILED"])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_compare_architectures(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, prefect_home: Path
) -> None:
    work, uri = _workdir(tmp_path, tmp_path_factory.getbasetemp())
    argv = ["compare", "--models", "lenet5,resnet18_cifar", "--dataset", "imagefolder",
            "--data-dir", "data", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
            "--max-concurrent", "2", "--json"]  # fmt: skip
    proc = run_cli(argv, work, cli_env(prefect_home))
    result = parse_json_stdout(proc)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"lenet5", "resnet18_cifar"}
    for r in rows.values():
        assert r["status"] == "ok"
        assert r["params"] > 0 and r["train_seconds"] > 0 and r["images_per_s"] > 0
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["best_val_accuracy"] <= 1
    assert rows["resnet18_cifar"]["params"] > 10 * rows["lenet5"]["params"]
    import mlflow

    c = mlflow.MlflowClient(uri)
    parent = result["parent_run_id"]
    children = c.search_runs(
        [c.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert {r.data.tags["model"] for r in children} == set(rows)
    assert {r.info.status for r in children} == {"FINISHED"}
    table = json.loads(Path(c.download_artifacts(parent, "comparison.json", str(tmp_path)))
                       .read_text())  # fmt: skip
    assert set(table["columns"]) >= {"model", "params", "test_accuracy", "images_per_s"}
