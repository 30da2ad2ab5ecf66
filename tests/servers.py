"""Real server processes for end-to-end tests: `mlflow server`, `prefect server` and a worker.

They are started through the infra/ scripts (so the scripts are tested too), each in its own
process group on a free 127.0.0.1 port, with all state (databases, artifacts, PREFECT_HOME) under
the test's tmp directory. Start-up waits on the server's health endpoint with a bounded timeout;
teardown kills every process group in the server's process tree (flow runs and torchrun jobs start
their own sessions), so a failed or timed-out test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common import health_problem
from tasks.launch import kill_tree, process_tree

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """One started server: its process, log file and base URL."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str
    leftovers: list[int] = field(default_factory=list)  # pids still running after stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process group in the server's process tree, SIGKILL what is left.

        The tree includes the worker's flow runs and their torchrun jobs, which start their own
        sessions and would survive a plain killpg. Same helper the training task uses."""
        tree = process_tree(self.proc.pid)
        kill_tree(self.proc.pid, grace=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self.leftovers = [pid for pid in tree if _running(pid)]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rpartition(b")")[2].split()[0] != b"Z"


def start_process(
    name: str, cmd: list[str], *, log_path: Path, env: Mapping[str, str], url: str
) -> ServerProcess:
    """Start `cmd` in a new process group with its output in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=REPO,
            start_new_session=True,
        )
    print(f"[servers] started {name} (pid {proc.pid}) at {url}; log {log_path}", file=sys.stderr)
    return ServerProcess(name=name, proc=proc, log_path=log_path, url=url)


def wait_http_ok(server: ServerProcess, health_url: str, *, timeout: float) -> float:
    """Poll `health_url` until it answers 200; fail fast if the process dies. Returns seconds."""
    start = time.monotonic()
    last_error = "no answer yet"
    while time.monotonic() - start < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with code {server.proc.returncode} before it was healthy."
                f"\n--- log tail ---\n{server.log_tail()}"
            )
        problem = health_problem(health_url, timeout=2)
        if problem is None:
            return time.monotonic() - start
        last_error = problem
        time.sleep(0.3)
    raise TimeoutError(
        f"{server.name} was not healthy at {health_url} within {timeout:.0f}s ({last_error})."
        f"\n--- log tail ---\n{server.log_tail()}"
    )


def base_env(**extra: str) -> dict[str, str]:
    """The current environment without any outside server settings, plus `extra`.

    UV_NO_SYNC: the infra scripts use `uv run`; the test env is already synced, leave it alone.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["UV_NO_SYNC"] = "1"
    env.update(extra)
    return env


def start_mlflow_server(tmp: Path) -> ServerProcess:
    """infra/mlflow-server.sh: SQLite store and served artifacts under `tmp`, one worker."""
    port = free_port()
    root = tmp / "mlflow-server"
    env = base_env(
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_ARTIFACTS_DESTINATION=str(root / "artifacts"),
        MLFLOW_WORKERS="1",
        # The GenAI job runner (huey consumers) is not needed and costs CPU on a small machine.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    return start_process(
        "mlflow server",
        ["bash", str(INFRA / "mlflow-server.sh")],
        log_path=tmp / "mlflow-server.log",
        env=env,
        url=f"http://127.0.0.1:{port}",
    )


def prefect_env(tmp: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Prefect settings that keep every byte of state under `tmp` and never phone home."""
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **extra,
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start_prefect_server(tmp: Path) -> ServerProcess:
    """infra/prefect-server.sh without UI. Its scheduler service is off so that no cron run of a
    test deployment can fire during the test; the schedules themselves are still stored."""
    port = free_port()
    env = prefect_env(tmp, PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port))
    return start_process(
        "prefect server",
        ["bash", str(INFRA / "prefect-server.sh"), "--no-ui", "--no-scheduler"],
        log_path=tmp / "prefect-server.log",
        env=env,
        url=f"http://127.0.0.1:{port}/api",
    )


def start_prefect_worker(
    tmp: Path, api_url: str, pool: str, env_extra: Mapping[str, str] | None = None
) -> ServerProcess:
    """infra/prefect-worker.sh on a process pool, polling every second, with its health server.

    `env_extra` (e.g. MLFLOW_TRACKING_URI) reaches every flow run the worker starts."""
    port = free_port()
    env = prefect_env(
        tmp / "worker",
        api_url,
        CNNPIPE_WORK_POOL=pool,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
        PREFECT_WORKER_WEBSERVER_PORT=str(port),
        **dict(env_extra or {}),
    )
    return start_process(
        "prefect worker",
        ["bash", str(INFRA / "prefect-worker.sh"), "--with-healthcheck"],
        log_path=tmp / "prefect-worker.log",
        env=env,
        url=f"http://127.0.0.1:{port}",
    )


@contextlib.contextmanager
def stopping(servers: list[ServerProcess]) -> Iterator[list[ServerProcess]]:
    """Stop every server in `servers` (also those appended inside the block), newest first."""
    try:
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()
