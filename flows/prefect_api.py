"""Prefect's embedded API server for one `cnnpipe` command, started as early as the command allows.

Why not let Prefect start it (its ephemeral `SubprocessASGIServer`): Prefect starts the server at
the flow's first API call, after this process has imported torch, MLflow and Prefect, and then
waits about 4 s for it to boot; importing the module that holds that class costs this process
another 1.7 s. Started here as a plain subprocess right after the torch-free checks, the boot runs
on another core while this process imports the rest. It is the server Prefect would start (uvicorn
on `prefect.server.api.server:create_app` with Prefect's ephemeral settings, on 127.0.0.1, in the
same PREFECT_HOME database); this process reaches it through PREFECT_API_URL, which Prefect reads
when it is first imported, so `start` must run before anything imports Prefect.

The server listens on a socket bound here (`uvicorn --fd`): no port race between choosing a
port and the server binding it. It runs in its own session (Ctrl-C in the terminal reaches the
training jobs, not the server that must record their final state) and stops when this process
dies, even by SIGKILL (`tasks.launch.watched_module_command`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tasks.common import health_problem
from tasks.launch import watched_module_command

# What Prefect's own ephemeral start sets (prefect/server/api/server.py, _run_uvicorn_command).
EPHEMERAL_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
DEFAULT_STARTUP_TIMEOUT_S = 90.0


class EmbeddedServerError(RuntimeError):
    """The embedded server did not come up (the machine, not the user's input)."""


class EmbeddedServer:
    """One server process and the URL of its API."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port: int = sock.getsockname()[1]
        args = ["--factory", "prefect.server.api.server:create_app", "--fd", str(sock.fileno()),
                "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        try:
            self.process = subprocess.Popen(
                watched_module_command(sys.executable, "uvicorn", args),
                env={**os.environ, **EPHEMERAL_ENV},
                pass_fds=[sock.fileno()],
                stdout=2,  # its output goes to stderr: with --json, stdout holds one document
                start_new_session=True,
            )
        finally:
            sock.close()  # the server holds its own copy

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout: float) -> None:
        """Until /health answers, then the first calls of a flow run (the server's version
        check and a flow-run query: both slow the first time) so that the flow itself does not
        pay for them. EmbeddedServerError (with the exit code) if the server does not start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise EmbeddedServerError(
                    f"Prefect's embedded API server exited with code {code} while starting (its "
                    "log is above); set PREFECT_API_URL to a running Prefect server instead"
                )
            if health_problem(f"{self.api_url}/health", timeout=2) is None:
                health_problem(f"{self.api_url}/admin/version", timeout=10)
                health_problem(f"{self.api_url}/flow_runs/filter", 10, json_body=b'{"limit": 1}')
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(
            f"Prefect's embedded API server did not start within {timeout:g} s; raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL to a "
            "running Prefect server"
        )

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_SERVER: list[EmbeddedServer] = []  # this process's server, once started
_READY: list[threading.Thread] = []  # waits for it in the background (I/O: no GIL contention)
_ERRORS: list[BaseException] = []


def start() -> bool:
    """Start the server and point this process's Prefect at it, unless a server is configured
    (PREFECT_API_URL, in the environment or the active profile), one was started already, or
    Prefect is already imported (an in-process caller keeps its own set-up, such as
    `prefect_test_harness`). True if it started one."""
    if _SERVER or "prefect" in sys.modules or os.environ.get("PREFECT_API_URL"):
        return False
    if _profile_sets_api_url():
        return False
    server = EmbeddedServer()
    _SERVER.append(server)
    os.environ["PREFECT_API_URL"] = server.api_url  # after Popen: the server must not see it
    timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")

    def ready() -> None:
        try:
            server.wait(float(timeout) if timeout else DEFAULT_STARTUP_TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by wait()
            _ERRORS.append(exc)

    thread = threading.Thread(target=ready, name="prefect-api-ready", daemon=True)
    thread.start()
    _READY.append(thread)
    return True


def wait() -> None:
    """Block until the server started by `start` answers (no-op if none was started). If
    Prefect's own settings name a server after all (prefect.toml, pyproject.toml or .env in the
    working directory), stop ours and use that one, as Prefect would have."""
    while _READY:
        _READY.pop().join()
    if not _SERVER:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import Settings

    ours, configured = os.environ.pop("PREFECT_API_URL"), None
    try:
        configured = Settings().api.url  # every settings source but our variable
    finally:
        if not configured:
            os.environ["PREFECT_API_URL"] = ours
        refresh_global_settings_context()  # Prefect read its settings when first imported
    if configured:
        _ERRORS.clear()
        stop()
    elif _ERRORS:
        raise _ERRORS.pop()


def _profile_sets_api_url() -> bool:
    """Whether the active Prefect profile sets PREFECT_API_URL (`prefect config set ...`), read
    without importing Prefect. The other settings sources are checked by `wait`."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):  # no file, or not TOML: Prefect itself will say so
        return False
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return bool(profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"))


def stop() -> None:
    """Stop the server started by `start`, if any (after Prefect has delivered its logs)."""
    while _SERVER:
        _SERVER.pop().stop()
