"""`cnnpipe deploy`: bad input fails early and clearly; end to end with real servers.

The end-to-end test starts real processes from infra/ on free 127.0.0.1 ports (prefect server,
mlflow server, a process worker), creates the scheduled deployments, checks the stored cron
schedules through Prefect's client API, triggers the nightly training deployment on tiny generated
images and checks through the MLflow server's API that a `champion` model version exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fakedata import make_imagefolder
from servers import (
    ServerProcess,
    free_port,
    prefect_env,
    start_mlflow_server,
    start_prefect_server,
    start_prefect_worker,
    stopping,
    wait_http_ok,
)

from flows import deploy
from flows.cli import build_parser
from flows.cli import main as cnnpipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reachable_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning checks that a download could start (offline it fails early by design); a
    mirror on 127.0.0.1 resolves, so the built-in datasets plan on this offline machine. The
    download itself never happens here."""
    monkeypatch.setenv("CNNPIPE_DATA_MIRROR", "http://127.0.0.1:9/")


def _folder(root: Path) -> Path:
    """An image folder big enough for the recipes' default batch (256) to take a step."""
    return make_imagefolder(root, n_train=130, n_val=1, size=8, formats=("png",))


def _closed_port_url() -> str:
    """A Prefect API URL nobody listens on: a check that contacts it fails."""
    return f"http://127.0.0.1:{free_port()}/api"


@pytest.mark.parametrize(
    ("extra_args", "expected"),
    [
        (["--nightly-cron", "61 2 * * *"], ["--nightly-cron", "61 2 * * *", "cron"]),
        (["--weekly-cron", "every sunday"], ["--weekly-cron", "every sunday"]),
        (["--timezone", "Mars/Olympus"], ["--timezone", "Mars/Olympus"]),
        (["--model", "no_such_net"], ["no_such_net", "cnnpipe models"]),
        (["--models", "lenet5,no_such_net"], ["no_such_net"]),
        (["--models", " , "], ["models is empty"]),
        (["--models", "lenet5,lenet5"], ["lenet5", "twice"]),
        (["--dataset", "cifar11"], ["cifar11", "cifar10"]),
        (["--dataset", "imagefolder", "--data-dir", "/nonexistent/imgs"], ["/nonexistent/imgs"]),
        (["--dataset", "imagefolder"], ["--data-dir"]),
        (["--epochs", "0"], ["epochs=0"]),
        (["--env", "NOEQUALS"], ["--env", "NOEQUALS"]),
        (["--work-pool", " "], ["--work-pool"]),
        (["--source", "/nonexistent/src"], ["--source", "/nonexistent/src"]),
        (["--train-timeout", "0"], ["--train-timeout", "positive"]),
        (["--gpu-limit", "0"], ["--gpu-limit 0"]),
    ],
)
def test_deploy_bad_input_fails_before_contacting_the_server(
    extra_args: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The API URL points at a closed port: the error must be about the bad value, which shows
    # that it was caught before anything talked to (let alone created on) a server.
    # --models lenet5 first: each case's own options come later and win.
    rc = cnnpipe(["deploy", "--api-url", _closed_port_url(), "--models", "lenet5", *extra_args])
    err = capsys.readouterr().err
    assert rc != 0
    for text in expected:
        assert text in err, err
    assert "unreachable" not in err


def test_deploy_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = _closed_port_url()
    rc = cnnpipe(["deploy", "--api-url", url, "--models", "lenet5"])
    err = capsys.readouterr().err
    assert rc != 0
    assert url in err and "unreachable" in err and "infra/prefect-server.sh" in err
    # One health request, no client retry loop: the check itself takes seconds at most.
    start = time.monotonic()
    with pytest.raises(ValueError, match="unreachable"):
        deploy.check_api_reachable(url)
    assert time.monotonic() - start < 10


def test_deploy_without_a_server_configured_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        rc = cnnpipe(["deploy", "--models", "lenet5"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "PREFECT_API_URL" in err and "--api-url" in err


def test_plan_uses_defaults_and_pins_data_dir(tmp_path: Path) -> None:
    import inspect

    from flows.pipeline import train_pipeline

    data = _folder(tmp_path / "imgs")
    nightly, weekly = deploy.plan_deployments(
        dataset="imagefolder", data_dir=str(data), models="lenet5", epochs=2
    )
    assert (nightly.name, nightly.cron, nightly.timezone) == ("nightly-train", "0 2 * * *", "UTC")
    assert (weekly.name, weekly.cron) == ("weekly-compare", "0 4 * * 0")
    default = inspect.signature(train_pipeline.fn).parameters["request"].default
    assert nightly.parameters == {
        "request": {
            "model": default.model,
            "dataset": "imagefolder",
            "data_dir": str(data.resolve()),
            "epochs": 2,
        }
    }  # register_as=None is not stored: the flow's default applies
    assert weekly.parameters["request"]["models"] == ["lenet5"]


def test_a_folder_too_small_for_the_batch_is_fixed_with_deploys_own_flag(tmp_path: Path) -> None:
    """The plan's advice (`use --batch-size N`) names a flag that `deploy` has: following it
    plans both deployments, which store the batch size."""
    import re

    data = make_imagefolder(tmp_path / "imgs", n_train=4, n_val=1, size=8, formats=("png",))
    with pytest.raises(ValueError, match="--batch-size") as info:
        deploy.plan_deployments(dataset="imagefolder", data_dir=str(data), models="lenet5")
    fit = int(re.search(r"--batch-size (\d+)", str(info.value)).group(1))
    args = build_parser().parse_args(["deploy", "--batch-size", str(fit)])
    nightly, weekly = deploy.plan_deployments(
        dataset="imagefolder", data_dir=str(data), models="lenet5", batch_size=args.batch_size
    )
    assert nightly.parameters["request"]["batch_size"] == fit
    assert weekly.parameters["request"]["batch_size"] == fit


def test_deployments_queue_carry_a_timeout_and_are_tagged(tmp_path: Path) -> None:
    """One run per deployment at a time (a late nightly run queues), a per-deployment
    training timeout passed to the flows, tags by model and dataset."""
    data = _folder(tmp_path / "imgs")
    nightly, weekly = deploy.plan_deployments(
        model="lenet5", dataset="imagefolder", data_dir=str(data), models="lenet5",
        train_timeout=3600,
    )  # fmt: skip
    assert nightly.concurrency_limit == weekly.concurrency_limit == 1
    assert nightly.parameters["request"]["train_timeout_seconds"] == 3600
    assert weekly.parameters["request"]["train_timeout_seconds"] == 3600
    assert {"cnnpipe", "model:lenet5", "dataset:imagefolder"} <= set(nightly.tags)
    for spec in (nightly, weekly):  # the flows take the parameter
        deploy.check_parameters(deploy.load_flow(str(REPO), spec.entrypoint), spec)


def test_no_private_prefect_imports() -> None:
    """Private modules change without notice between Prefect releases."""
    for path in (REPO / "flows" / "deploy.py", REPO / "tasks" / "gpu_limit.py"):
        assert "prefect._internal" not in path.read_text(), path


def test_weekly_comparison_defaults_to_the_flows_model_list() -> None:
    """`cnnpipe deploy` with no --models must work: the flow's default list is valid and used."""
    import inspect

    from flows.pipeline import compare_architectures

    _, weekly = deploy.plan_deployments(dataset="cifar10")
    default = inspect.signature(compare_architectures.fn).parameters["request"].default.models
    assert weekly.parameters["request"]["models"] == list(default)


def test_imagefolder_without_train_split_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        deploy.plan_deployments(
            dataset="imagefolder", data_dir=str(tmp_path / "empty"), models="lenet5"
        )


def test_parameters_are_checked_against_the_real_flows() -> None:
    """A parameter the flow does not take fails with the flow's name, before any server call."""
    specs = deploy.plan_deployments(models="lenet5", dataset="cifar10")
    for spec in specs:  # the planned parameters fit the real flows
        deploy.check_parameters(deploy.load_flow(str(REPO), spec.entrypoint), spec)
    bad = deploy.DeploymentSpec(
        name="nightly-train",
        entrypoint=deploy.TRAIN_ENTRYPOINT,
        cron="0 2 * * *",
        timezone="UTC",
        parameters={**specs[0].parameters, "no_such_parameter": 1},
        description="",
    )
    with pytest.raises(ValueError, match="no_such_parameter"):
        deploy.check_parameters(deploy.load_flow(str(REPO), bad.entrypoint), bad)


# --------------------------------------------------------------------------------------------
# End to end with real servers
# --------------------------------------------------------------------------------------------

POOL = "e2e-process"
MODEL_NAME = "e2e-lenet5"


def _flow_run_logs(client: Any, flow_run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(f"{log.level} {log.message}" for log in logs)[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_deployments_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.monotonic()
    timings: dict[str, float] = {}
    servers: list[ServerProcess] = []
    with stopping(servers):
        prefect = start_prefect_server(tmp_path)
        servers.append(prefect)
        mlflow = start_mlflow_server(tmp_path)
        servers.append(mlflow)
        wait_http_ok(prefect, f"{prefect.url}/health", timeout=120)
        wait_http_ok(mlflow, f"{mlflow.url}/health", timeout=120)
        timings["servers"] = time.monotonic() - t0

        # 2 x 130 training images: the deployment's default global batch (256) must fit the
        # split, which the plan step checks before anything is created.
        data = make_imagefolder(tmp_path / "imgs", n_train=130, n_val=8, size=32)
        with (
            temporary_settings({PREFECT_API_URL: prefect.url}),
            get_client(sync_client=True) as client,
        ):
            # Bad input against a live server: non-zero exit and nothing created.
            t = time.monotonic()
            rc = cnnpipe(
                ["deploy", "--work-pool", POOL, "--models", "lenet5,no_such_net"]
                + ["--api-url", prefect.url]
            )
            assert rc != 0 and "no_such_net" in capsys.readouterr().err
            assert client.read_deployments() == []
            assert POOL not in [p.name for p in client.read_work_pools()]
            # A pool of another type is not silently used (its workers could not run these).
            client.create_work_pool(
                WorkPoolCreate(name="k8s-pool", type="kubernetes", base_job_template={})
            )
            rc = cnnpipe(
                ["deploy", "--work-pool", "k8s-pool", "--models", "lenet5"]
                + ["--api-url", prefect.url]
            )
            assert rc != 0 and "'kubernetes'" in capsys.readouterr().err
            assert client.read_deployments() == []
            timings["bad_input"] = time.monotonic() - t

            # The real console script, as a user runs it.
            args = [
                "deploy",
                "--work-pool", POOL,
                "--model", "lenet5",
                "--models", "lenet5",
                "--dataset", "imagefolder",
                "--data-dir", str(data),
                "--epochs", "1",
                "--register-as", MODEL_NAME,
                "--tracking-uri", mlflow.url,
            ]  # fmt: skip
            t = time.monotonic()
            proc = subprocess.run(
                [str(Path(sys.executable).parent / "cnnpipe"), *args, "--json"],
                env=prefect_env(tmp_path / "cli", prefect.url),
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=180,
            )
            timings["deploy"] = time.monotonic() - t
            assert proc.returncode == 0, proc.stderr[-4000:]
            result = json.loads(proc.stdout)  # exactly one JSON object on stdout
            assert result["work_pool"] == POOL and result["work_pool_created"] is True
            names = {d["name"].split("/")[1]: d["name"] for d in result["deployments"]}
            assert set(names) == {"nightly-train", "weekly-compare"}

            # The schedules and parameters are stored on the server.
            pool = client.read_work_pool(POOL)
            assert pool.type == "process"
            nightly = client.read_deployment_by_name(names["nightly-train"])
            weekly = client.read_deployment_by_name(names["weekly-compare"])
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
            assert [s.schedule.cron for s in weekly.schedules] == ["0 4 * * 0"]
            assert all(s.active for s in nightly.schedules + weekly.schedules)
            assert nightly.schedules[0].schedule.timezone == "UTC"
            assert nightly.work_pool_name == weekly.work_pool_name == POOL
            assert nightly.parameters["request"]["model"] == "lenet5"
            assert nightly.parameters["request"]["data_dir"] == str(data.resolve())
            assert weekly.parameters["request"]["models"] == ["lenet5"]
            assert nightly.job_variables["env"]["MLFLOW_TRACKING_URI"] == mlflow.url
            # A late run queues behind the running one. The server keeps a limit given with a
            # collision strategy as a global concurrency limit, so read it from there.
            gcl = getattr(nightly, "global_concurrency_limit", None)
            assert (nightly.concurrency_limit or (gcl.limit if gcl else None)) == 1
            assert {"model:lenet5", "dataset:imagefolder"} <= set(nightly.tags)

            # The worker starts now (the pool exists) and warms up during the re-deploy below.
            worker = start_prefect_worker(tmp_path, prefect.url, POOL)
            servers.append(worker)

            # Re-deploying with another cron updates in place: still one schedule per deployment.
            t = time.monotonic()
            assert cnnpipe([*args, "--weekly-cron", "30 5 * * 6", "--api-url", prefect.url]) == 0
            timings["redeploy"] = time.monotonic() - t
            weekly = client.read_deployment_by_name(names["weekly-compare"])
            assert [s.schedule.cron for s in weekly.schedules] == ["30 5 * * 6"]
            assert len(client.read_deployments()) == 2

            # The worker runs the nightly deployment now, on the tiny images. Its environment has
            # no MLFLOW_* variables: the tracking URI reaches the run through the deployment.
            ml = MlflowClient(tracking_uri=mlflow.url, registry_uri=mlflow.url)
            assert ml.search_model_versions(f"name = '{MODEL_NAME}'") == []
            wait_http_ok(worker, f"{worker.url}/health", timeout=90)
            t = time.monotonic()
            flow_run = run_deployment(
                names["nightly-train"],
                # The run's request: the deployment's, with two fields changed (a flow run's
                # parameters replace the deployment's per name, so the request is given whole).
                parameters={
                    "request": {
                        **nightly.parameters["request"],
                        "batch_size": 8,
                        "output_dir": str(tmp_path / "run"),
                    }
                },  # fmt: skip
                timeout=240,
                poll_interval=2,
                as_subflow=False,
            )
            timings["run"] = time.monotonic() - t
            state = flow_run.state
            assert state is not None and state.is_completed(), (
                f"flow run ended {state}\n--- flow run logs ---\n"
                f"{_flow_run_logs(client, flow_run.id)}\n--- worker log ---\n{worker.log_tail()}"
            )

        # The MLflow server (not a local store) shows the new champion version.
        champion = ml.get_model_version_by_alias(MODEL_NAME, "champion")
        assert int(champion.version) >= 1
        run = ml.get_run(champion.run_id)
        assert run.info.status == "FINISHED"
        # ... and it is the version this triggered flow run registered.
        assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
        assert 0.0 <= float(run.data.metrics["test_accuracy"]) <= 1.0
    # Teardown stopped every server and everything they started (flow runs, torchrun, workers).
    assert {s.name: s.leftovers for s in servers if s.leftovers} == {}
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()  # the run used our output dir
    timings["total"] = time.monotonic() - t0
    with capsys.disabled():
        print(f"\ndeploy e2e timings (s): { {k: round(v, 1) for k, v in timings.items()} }")
