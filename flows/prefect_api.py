"""Prefect's embedded API server for one `cnnpipe` command, started as early as the command allows.

Why not let Prefect start it (its ephemeral `SubprocessASGIServer`): Prefect starts the server at
the flow's first API call, after this process has imported torch, MLflow and Prefect, and then
waits about 4 s for it to boot; importing the module that holds that class costs this process
another 1.7 s. Here the server process starts in two steps, both on the other core while this
process works: `prepare()` right after the torch-free checks spawns it to import Prefect's server
(the slow part, about 3 s, which writes nothing), and `start()` once the whole plan has passed
tells it to serve (create or open the database, answer requests). A bad input found in between
only ends a process that never served. It is the server Prefect would start (uvicorn on
`prefect.server.api.server:create_app` with Prefect's ephemeral settings, on 127.0.0.1, in the
same PREFECT_HOME database); this process reaches it through PREFECT_API_URL, which Prefect reads
when it is first imported, so `start` must run before anything imports Prefect.

The server listens on a socket bound here (`uvicorn --fd`): no port race between choosing a
port and the server binding it. It runs in its own session (Ctrl-C in the terminal reaches the
training jobs, not the server that must record their final state) and stops when this process
dies, even by SIGKILL (`tasks.launch.watched_module_command`; and a server still waiting for
its go sees its stdin close).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tasks.common import file_lock, health_problem
from tasks.launch import watched_module_command

# What Prefect's own ephemeral start sets (prefect/server/api/server.py, _run_uvicorn_command).
EPHEMERAL_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
DEFAULT_STARTUP_TIMEOUT_S = 90.0


class ApiUnavailableError(RuntimeError):
    """The configured Prefect server does not answer (bad input: exit 2, like MLflow's)."""


class EmbeddedServerError(RuntimeError):
    """The embedded server did not come up (the machine, not the user's input)."""


class EmbeddedServer:
    """One server process and the URL of its API. Created, the process imports Prefect's server
    and waits; `serve()` lets it serve."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port: int = sock.getsockname()[1]
        args = ["--factory", "prefect.server.api.server:create_app", "--fd", str(sock.fileno()),
                "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        try:
            self.process = subprocess.Popen(
                watched_module_command(sys.executable, __name__, args),
                env={**os.environ, **EPHEMERAL_ENV},
                pass_fds=[sock.fileno()],
                stdin=subprocess.PIPE,
                stdout=2,  # its output goes to stderr: with --json, stdout holds one document
                start_new_session=True,
            )
        finally:
            sock.close()  # the server holds its own copy

    def serve(self) -> None:
        """Tell the process to serve (it may still be importing: it serves when done)."""
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # already gone: wait() reports its exit code
            self.process.stdin.write(b"serve\n")
            self.process.stdin.close()

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
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # a process still waiting for its go ends on EOF
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_SERVER: list[EmbeddedServer] = []  # this process's server, once spawned
_READY: list[threading.Thread] = []  # waits for it in the background (I/O: no GIL contention)
_ERRORS: list[BaseException] = []


def prepare() -> bool:
    """Spawn the server process to import Prefect's server (nothing is written) unless a server
    is configured (PREFECT_API_URL, in the environment or the active profile), one exists
    already, Prefect is already imported (an in-process caller keeps its own set-up, such as
    `prefect_test_harness`), or PREFECT_HOME does not exist yet. True if it spawned one."""
    if _SERVER or not _may_start():
        return False
    if not _prefect_home().is_dir():
        return False  # importing Prefect would create it: on the very first run, `start` spawns
    _SERVER.append(EmbeddedServer())
    return True


def _may_start() -> bool:
    """No server configured (environment, active profile) and Prefect not yet imported."""
    if "prefect" in sys.modules or os.environ.get("PREFECT_API_URL"):
        return False
    return not _profile_api_url()


def check_configured(timeout: float = 5.0) -> None:
    """A configured Prefect server (PREFECT_API_URL, or the active profile's) answers its
    health check, so an unreachable one fails before anything runs or is written, with the
    fix, instead of Prefect's traceback when the flow starts."""
    url = os.environ.get("PREFECT_API_URL") or _profile_api_url()
    if not url or (_SERVER and url == _SERVER[0].api_url):
        return
    fix = "start that server (`prefect server start`) or unset PREFECT_API_URL for the embedded one"
    try:  # any HTTP answer counts: Prefect Cloud may want the API key even here
        problem = health_problem(url.rstrip("/") + "/health", timeout, any_answer=True)
    except ValueError:
        raise ApiUnavailableError(
            f"PREFECT_API_URL={url!r} is not a URL (e.g. http://127.0.0.1:4200/api); {fix}"
        ) from None
    if problem is not None:
        raise ApiUnavailableError(f"Prefect API {url} is unreachable ({problem}); {fix}")


def start() -> bool:
    """Let the server serve (spawning it first if `prepare` did not) and point this process's
    Prefect at it; `wait()` then blocks until it answers. True if this process has a server."""
    if not _SERVER:
        if not _may_start():
            return False
        _SERVER.append(EmbeddedServer())
    server = _SERVER[0]
    if os.environ.get("PREFECT_API_URL") == server.api_url:
        return True  # started already
    server.serve()
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
    if not _SERVER or os.environ.get("PREFECT_API_URL") != _SERVER[0].api_url:
        return  # none started (none spawned, or spawned but never told to serve)
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


def _prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it by default."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _profile_api_url() -> str | None:
    """The active Prefect profile's PREFECT_API_URL (`prefect config set ...`), read without
    importing Prefect. The other settings sources are checked by `wait`."""
    import tomllib

    path = os.environ.get("PREFECT_PROFILES_PATH") or _prefect_home() / "profiles.toml"
    path = Path(path).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, ValueError):  # no file, or not TOML: Prefect itself will say so
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def stop() -> None:
    """Stop this process's server, if any (after Prefect has delivered its logs)."""
    while _SERVER:
        _SERVER.pop().stop()


def _prepare_database_under_lock() -> None:
    """Create or upgrade Prefect's database and register its block types, holding a lock in
    PREFECT_HOME. Servers started together on a new PREFECT_HOME would otherwise each run both,
    and one dies on "duplicate column" (migrations) or "UNIQUE constraint failed:
    block_type.slug" (block registration, seen once in 5 tries with 3 servers on 2 busy cores).
    Each server's own start-up then finds the tables and block types there: nothing to insert."""
    import asyncio

    import prefect.settings
    from prefect.server.database import provide_database_interface
    from prefect.server.models.block_registration import run_block_auto_registration

    migrate = prefect.settings.PREFECT_API_DATABASE_MIGRATE_ON_START.value()
    # Registration costs ~0.5 s: only while Prefect's memo store does not yet record it (a new
    # PREFECT_HOME); after that each server's start-up skips it or only updates existing rows.
    memo = prefect.settings.PREFECT_MEMO_STORE_PATH.value()
    registered = memo.is_file() and "block_auto_registration" in memo.read_text(errors="replace")
    register = prefect.settings.PREFECT_API_BLOCKS_REGISTER_ON_START.value() and not registered
    if not (migrate or register):
        return

    async def prepare_database() -> None:
        db = provide_database_interface()
        if migrate:
            await db.create_db()
        if register:
            async with await db.session() as session:
                await run_block_auto_registration(session=session)

    home = _prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home / ".cnnpipe-migrate.lock"):
        asyncio.run(prepare_database())


def _serve_when_told(uvicorn_args: list[str]) -> None:
    """The server process: import Prefect's server now, serve once the parent says so. An
    end of input instead (the plan failed, or the parent died) ends it having written nothing."""
    import prefect.server.api.server  # noqa: F401 - the slow part, before the go
    from uvicorn.main import main as uvicorn_main

    if sys.stdin.readline().strip() == "serve":
        _prepare_database_under_lock()
        uvicorn_main(uvicorn_args)


if __name__ == "__main__":
    _serve_when_told(sys.argv[1:])
