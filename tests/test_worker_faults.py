"""A deployment's flow run under the faults production sees, with a real `prefect server`, a real
process worker and a real `mlflow server` (issue 8 item 5, issue 10 item 4):

- cancelled from Prefect while it trains: the worker's SIGTERM stops the flow run, torchrun and
  its workers within seconds, and the MLflow run ends KILLED;
- its process SIGKILLed while it trains (a crashed worker host), then `prefect flow-run retry`:
  the same flow run finds its MLflow run and checkpoint, resumes ("resumed from" in its logs),
  logs every epoch once into that one run and registers one version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from fakedata import make_imagefolder
from servers import (
    prefect_env,
    start_mlflow_server,
    start_prefect_server,
    start_prefect_worker,
    stopping,
    wait_http_ok,
)

from flows.cli import main as cnnpipe

pytestmark = pytest.mark.slow

POOL = "faults-process"
MODEL_NAME = "faults-lenet5"
EPOCHS = 12
PREFECT = str(Path(sys.executable).parent / "prefect")  # the CLI a user runs


def _flow_run_processes(flow_run_id: str) -> list[psutil.Process]:
    """Every live process started for this flow run (the worker puts its id in their env)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _flow_process(flow_run_id: str) -> psutil.Process:
    """The flow run's own process: the one of its processes whose parent is not one of them."""
    procs = _flow_run_processes(flow_run_id)
    pids = {p.pid for p in procs}
    (top,) = [p for p in procs if p.ppid() not in pids]
    return top


def _wait(what: str, check: Any, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _state(client: Any, flow_run_id: Any) -> Any:
    return client.read_flow_run(flow_run_id).state


def _logs(client: Any, flow_run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


@pytest.mark.timeout(900)
def test_cancel_and_crash_of_a_deployed_flow_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    data = make_imagefolder(tmp_path / "imgs", n_train=400, n_val=8, size=32, formats=("png",))
    servers: list[Any] = []
    with stopping(servers):
        prefect = start_prefect_server(tmp_path)
        mlflow = start_mlflow_server(tmp_path)
        servers += [prefect, mlflow]
        wait_http_ok(prefect, f"{prefect.url}/health", timeout=180)
        wait_http_ok(mlflow, f"{mlflow.url}/health", timeout=180)
        deploy = ["deploy", "--work-pool", POOL, "--model", "lenet5", "--models", "lenet5",
                  "--dataset", "imagefolder", "--data-dir", str(data), "--epochs", str(EPOCHS),
                  "--register-as", MODEL_NAME, "--tracking-uri", mlflow.url,
                  "--api-url", prefect.url]  # fmt: skip
        assert cnnpipe(deploy) == 0
        worker = start_prefect_worker(tmp_path, prefect.url, POOL)
        servers.append(worker)
        wait_http_ok(worker, f"{worker.url}/health", timeout=120)
        ml = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)
        cli_env = prefect_env(tmp_path / "cli", prefect.url)

        with (
            temporary_settings({PREFECT_API_URL: prefect.url}),
            get_client(sync_client=True) as client,
        ):
            (nightly,) = [d for d in client.read_deployments() if d.name == "nightly-train"]
            name = f"train-pipeline/{nightly.name}"

            def start(out: Path) -> str:
                request = {
                    **nightly.parameters["request"],
                    "batch_size": 8,
                    "output_dir": str(out),
                    "overrides": ["ckpt_interval_steps=10"],
                }
                run = run_deployment(name, parameters={"request": request}, timeout=0)
                _wait(f"a checkpoint in {out}", (out / "checkpoints" / "last.pt").exists, 300)
                return str(run.id)

            # 1. Cancelled from Prefect while training: everything stops, the run is KILLED.
            cancelled = start(tmp_path / "cancelled")
            running = _flow_run_processes(cancelled)
            assert any("torch.distributed.run" in " ".join(p.cmdline()) for p in running)
            subprocess.run([PREFECT, "flow-run", "cancel", cancelled], env=cli_env,
                           check=True, capture_output=True, timeout=120)  # fmt: skip
            t = time.monotonic()
            _wait("the cancelled flow run's processes to end",
                  lambda: not [p for p in running if p.is_running()], 60, every=0.5)  # fmt: skip
            stopped_after = time.monotonic() - t
            assert stopped_after < 30, stopped_after  # the worker polls, then SIGTERM: seconds
            _wait("state Cancelled", lambda: _state(client, cancelled).is_cancelled(), 60)
            (run,) = ml.search_runs(
                [ml.get_experiment_by_name("cnnpipe").experiment_id],
                filter_string=f"tags.`prefect.flow_run_id` = '{cancelled}'",
            )
            _wait("the MLflow run to end", lambda: ml.get_run(run.info.run_id).info.status
                  != "RUNNING", 30)  # fmt: skip
            assert ml.get_run(run.info.run_id).info.status == "KILLED"

            # 2. The flow run's process SIGKILLed mid-training, then retried: it resumes.
            crashed = start(tmp_path / "crashed")
            os.kill(_flow_process(crashed).pid, signal.SIGKILL)
            _wait("state Crashed", lambda: _state(client, crashed).is_crashed(), 120)
            _wait("the crashed run's torchrun to end", lambda: not _flow_run_processes(crashed),
                  60)  # fmt: skip
            subprocess.run([PREFECT, "flow-run", "retry", crashed], env=cli_env,
                           check=True, capture_output=True, timeout=120)  # fmt: skip
            _wait("the retried flow run to finish",
                  lambda: _state(client, crashed).is_final(), 600, every=2)  # fmt: skip
            state = _state(client, crashed)
            assert state.is_completed(), f"{state}\n{_logs(client, crashed)[-4000:]}"
            assert "resumed from" in _logs(client, crashed)

        runs = ml.search_runs(
            [ml.get_experiment_by_name("cnnpipe").experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{crashed}'",
        )
        assert len(runs) == 1  # one MLflow run across both attempts
        run_id = runs[0].info.run_id
        assert ml.get_run(run_id).info.status == "FINISHED"
        steps = [m.step for m in ml.get_metric_history(run_id, "val_accuracy")]
        assert steps == list(range(1, EPOCHS + 1))  # every epoch once, no duplicate steps
        versions = ml.search_model_versions(f"name = '{MODEL_NAME}'")
        assert [v.run_id for v in versions] == [run_id]  # one version, from the retried run
    assert {s.name: s.leftovers for s in servers if s.leftovers} == {}
