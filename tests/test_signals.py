"""Issue 10, items 2 and 4: a real `cnnpipe` process tree (cnnpipe, Prefect's embedded server,
torchrun, its workers) meets real signals and real job failures. Asserted: exit code, the
final line, the time bound, nothing left running, the MLflow run's status and reason, no
further model started and no empty run folder left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flows_helpers import cli_env, cnnpipe, copy_store, mlflow_template, tiny_dataset

from flows.cli import EXIT_GRACE_S, SIGNAL_GRACE_S
from tasks.launch import _alive, process_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process trees: Linux"),
]

LONG = ["--dataset", "imagefolder", "--data-dir", "data", "--epochs", "500", "--batch-size", "8",
        "--retries", "1"]  # fmt: skip


class Cli:
    """A `cnnpipe` process in its own process group (as a terminal runs it), output collected."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cnnpipe(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in ln for ln in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        tail = "\n".join(self.lines[-30:])
        raise AssertionError(f"never saw {needle!r} (exit {self.proc.poll()}):\n{tail}")

    def wait(self, timeout: float) -> tuple[int, float]:
        t0 = time.monotonic()
        code = self.proc.wait(timeout=timeout)
        elapsed = time.monotonic() - t0
        self.reader.join(15)  # the last lines (EOF once every holder of the pipe has exited)
        return code, elapsed

    @property
    def last(self) -> str:
        return next((ln for ln in reversed(self.lines) if ln.strip()), "")


# The CLI's own bound on a signalled exit (its watchdog), plus process start-up slack.
STOP_BOUND_S = EXIT_GRACE_S + SIGNAL_GRACE_S + 3


def _left_running(pids: list[int], timeout: float = 2.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.fixture()
def setup(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    work = tmp_path / "work"
    tiny_dataset(work / "data", n_train=30, n_val=10)
    uri = copy_store(mlflow_template(tmp_path_factory.getbasetemp()), work)
    env = cli_env(tmp_path_factory.getbasetemp() / "prefect-home")
    return work, env, uri


def _runs(uri: str) -> list:
    import mlflow

    c = mlflow.MlflowClient(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(exps) if exps else []


def test_ctrl_c_to_the_process_group_stops_everything(setup: tuple[Path, dict, str]) -> None:
    work, env, uri = setup
    cli = Cli(["train", "--model", "lenet5", *LONG], work, env)
    cli.wait_for("cnn.train: lenet5")  # the engine runs inside torchrun
    tree = process_tree(cli.proc.pid)
    assert len(tree) >= 4, tree  # cnnpipe, Prefect server, pdeathsig/torchrun, worker
    os.killpg(cli.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code, seconds = cli.wait(timeout=30)
    assert code == 130, "\n".join(cli.lines[-20:])
    assert seconds < STOP_BOUND_S
    assert cli.last.startswith("cnnpipe train: interrupted"), cli.last
    assert not any("Traceback" in ln for ln in cli.lines)
    assert _left_running(tree, timeout=10) == []  # the server's parent watch: <= 3.2 s
    (run,) = _runs(uri)
    assert run.info.status == "KILLED" and "SIGINT" in run.data.tags["failure_reason"]


def test_sighup_closing_the_terminal_stops_everything(setup: tuple[Path, dict, str]) -> None:
    """A closed terminal (SIGHUP to cnnpipe) is a stop like SIGTERM: jobs stopped, the run
    marked KILLED with the signal's name, exit 128 + 1."""
    work, env, uri = setup
    cli = Cli(["train", "--model", "lenet5", *LONG], work, env)
    cli.wait_for("cnn.train: lenet5")
    tree = process_tree(cli.proc.pid)
    cli.proc.send_signal(signal.SIGHUP)
    code, seconds = cli.wait(timeout=30)
    assert code == 128 + signal.SIGHUP, "\n".join(cli.lines[-20:])
    assert seconds < STOP_BOUND_S
    assert cli.last.startswith("cnnpipe train: terminated (signal 1)"), cli.last
    assert not any("Traceback" in ln for ln in cli.lines)
    assert _left_running(tree, timeout=10) == []
    (run,) = _runs(uri)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "terminated (SIGHUP)"


def test_sigterm_to_compare_starts_no_further_model(setup: tuple[Path, dict, str]) -> None:
    work, env, uri = setup
    cli = Cli(["compare", "--models", "lenet5,alexnet_cifar", "--max-concurrent", "1", *LONG],
              work, env)  # fmt: skip
    cli.wait_for("cnn.train: lenet5")
    tree = process_tree(cli.proc.pid)
    launched = sum("launching" in ln for ln in cli.lines)
    cli.proc.send_signal(signal.SIGTERM)
    code, seconds = cli.wait(timeout=30)
    assert code == 143, "\n".join(cli.lines[-20:])
    assert seconds < STOP_BOUND_S
    assert cli.last.startswith("cnnpipe compare: terminated"), cli.last
    assert _left_running(tree, timeout=10) == []  # the server's parent watch: <= 3.2 s
    time.sleep(3)  # a second model would have been launched by now
    assert not any("cnn.train: alexnet_cifar" in ln for ln in cli.lines)
    assert launched == 1 and sum("launching" in ln for ln in cli.lines) == launched
    statuses = {r.data.tags.get("model", "parent"): r.info.status for r in _runs(uri)}
    assert statuses["lenet5"] == "KILLED" and statuses["parent"] == "KILLED", statuses


def test_sigkill_leaves_nothing_and_the_run_is_closed_later(
    setup: tuple[Path, dict, str],
) -> None:
    from flows.cli import _mark_orphaned_runs

    work, env, uri = setup
    cli = Cli(["train", "--model", "lenet5", *LONG], work, env)
    cli.wait_for("cnn.train: lenet5")
    tree = process_tree(cli.proc.pid)
    cli.proc.kill()
    cli.wait(timeout=10)
    assert _left_running(tree, timeout=10) == [], "torchrun or the Prefect server outlived it"
    (run,) = _runs(uri)
    assert run.info.status == "RUNNING"  # nobody could close it ...
    assert _mark_orphaned_runs(uri) == 1  # ... until the next cnnpipe start looks
    (run,) = _runs(uri)
    assert run.info.status == "KILLED" and "orphaned" in run.data.tags["failure_reason"]


def test_a_failing_job_ends_with_its_own_exception_and_no_retry(
    setup: tuple[Path, dict, str],
) -> None:
    """Item 2: the final line is the job's exception (type, message, rank), a deterministic
    failure is not retried, the run is FAILED with the reason, no empty runs/ is left."""
    work, env, uri = setup
    env = {**env, "CNNPIPE_TEST_NAN_AT_STEP": "1"}
    cli = Cli(["train", "--model", "lenet5", *LONG[:4], "--epochs", "1", "--batch-size", "8"],
              work, env)  # fmt: skip
    code, _ = cli.wait(timeout=400)
    assert code == 1, "\n".join(cli.lines[-30:])
    assert cli.last.startswith(
        "cnnpipe train: error: training job failed on rank 0: FloatingPointError: non-finite"
    ), cli.last
    assert sum("launching" in ln for ln in cli.lines) == 1, "a deterministic failure was retried"
    (run,) = _runs(uri)
    assert run.info.status == "FAILED"
    assert "FloatingPointError" in run.data.tags["failure_reason"]
    assert not (work / "runs").exists()
