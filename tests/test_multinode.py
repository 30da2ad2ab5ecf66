"""One MLflow run per multi-node job (issue 8, item 6), for real: two `cnnpipe train --nnodes 2`
processes on 127.0.0.1, each with its own Prefect home (two hosts), meet through torchrun's c10d
rendezvous, log into one MLflow run on a real `mlflow server`, and only the node that hosted
global rank 0 evaluates and registers. Both see the same output directory, as nodes on a shared
filesystem do."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flows_helpers import cli_env, cnnpipe, tiny_dataset
from servers import free_port, start_mlflow_server, stopping, wait_http_ok

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_two_nodes_log_into_one_run_and_one_node_registers(tmp_path: Path) -> None:
    import mlflow

    data = tiny_dataset(tmp_path / "bugs", n_train=40, n_val=8)
    with stopping([start_mlflow_server(tmp_path)]) as servers:
        server = servers[0]
        wait_http_ok(server, f"{server.url}/health", timeout=180)
        port = free_port()
        args = [
            "train", "--model", "lenet5", "--dataset", "imagefolder", "--data-dir", str(data),
            "--epochs", "2", "--batch-size", "16", "--nnodes", "2",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--json",
        ]  # fmt: skip
        procs = [
            subprocess.Popen(
                cnnpipe(*args),
                cwd=tmp_path,
                env=cli_env(tmp_path / f"prefect-node{node}", MLFLOW_TRACKING_URI=server.url),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for node in (0, 1)
        ]
        outs = [p.communicate(timeout=540) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-4000:]
        results = [json.loads(out) for out, _ in outs]

        # Both nodes name the same run; exactly one of them (rank 0's) registered a version.
        assert results[0]["run_id"] == results[1]["run_id"]
        registered = [r for r in results if r.get("model_version")]
        assert len(registered) == 1, results
        assert sum(r.get("rank0") is False for r in results) == 1

        c = mlflow.MlflowClient(server.url)
        exp = c.get_experiment_by_name("cnnpipe")
        (run,) = c.search_runs([exp.experiment_id])  # one run for the whole job
        assert run.info.run_id == results[0]["run_id"]
        assert run.info.status == "FINISHED"
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == [1, 2]  # logged once per epoch, by global rank 0 only
        assert "test_accuracy" in run.data.metrics
        (version,) = c.search_model_versions(f"run_id = '{run.info.run_id}'")
        assert version.version == str(registered[0]["model_version"])
