"""Item 6 of issue 8: one MLflow run per multi-node job. Two `cnnpipe train --nnodes 2` agents on
127.0.0.1 (real processes, each with its own Prefect home and working directory, as on two
machines; one MLflow store), meeting at a c10d rendezvous. Whichever of them hosts global rank 0
(ranks go by arrival), the job leaves exactly one MLflow run, and that node's flow evaluates and
registers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flows_helpers import cli_env, cnnpipe, copy_store, mlflow_template, tiny_dataset
from servers import free_port

pytestmark = pytest.mark.slow


def test_two_nodes_leave_one_mlflow_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    uri = copy_store(mlflow_template(tmp_path_factory.getbasetemp()), tmp_path / "store")
    data = tiny_dataset(tmp_path / "data")
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in (0, 1):
        work = tmp_path / f"node{node}"
        work.mkdir()
        env = cli_env(tmp_path / f"prefect{node}", MLFLOW_TRACKING_URI=uri)
        argv = ["train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", str(data),
                "--cache-dir", str(work / "cache"), "--epochs", "1", "--batch-size", "16",
                "--device", "cpu", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                "--register-as", "lenet5-2nodes", "--retries", "0", "--json"]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cnnpipe(*argv),
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    outs = [p.communicate(timeout=900) for p in procs]
    codes = [p.returncode for p in procs]
    logs = "\n".join(f"--- node {i} (exit {c}) ---\n{e[-3000:]}" for i, (c, (_, e)) in
                     enumerate(zip(codes, outs, strict=True)))  # fmt: skip
    assert codes == [0, 0], logs
    results = [json.loads(out) for out, _ in outs]
    main = [r for r in results if r.get("model_version")]
    assert len(main) == 1, results  # exactly one node evaluated and registered
    import mlflow

    c = mlflow.MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(exps)  # active runs only: the idle node's empty run is deleted
    assert [r.info.run_id for r in runs] == [main[0]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
    assert run.data.params["model"] == "lenet5"
    versions = c.search_model_versions("name = 'lenet5-2nodes'")
    assert [v.run_id for v in versions] == [run.info.run_id]
