"""flows/prefect_api.py: the CLI's own start of Prefect's embedded API server. Each test runs a
fresh interpreter (the module must act before Prefect is imported, and pytest imports it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flows_helpers import cli_env, tiny_dataset

from tasks.launch import _alive

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys, urllib.request
from flows import prefect_api
from tasks.launch import _alive
out = {"started": prefect_api.start(), "again": prefect_api.start(),
       "url": os.environ.get("PREFECT_API_URL")}
out["pids"] = [s.process.pid for s in prefect_api._SERVER]
try:
    prefect_api.wait()
    if prefect_api._SERVER:  # still ours (not replaced by a configured server)
        out["health"] = urllib.request.urlopen(out["url"] + "/health", timeout=5).read().decode()
except prefect_api.EmbeddedServerError as exc:
    out["error"] = str(exc)
if "prefect" in sys.modules:
    from prefect.settings import get_current_settings
    out["prefect_uses"] = get_current_settings().api.url
pids = out.pop("pids")
out["server_alive"] = [_alive(p) for p in pids]
prefect_api.stop()
out["after_stop"] = [_alive(p) for p in pids]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Prefect home for the module: creating its database takes the server ~20 s."""
    return tmp_path_factory.mktemp("prefect-home")


def _run(tmp_path: Path, home: Path | None = None, **env: str) -> dict[str, Any]:
    base = cli_env(home or tmp_path / "prefect-home", **env)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=base, capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_server_starts_answers_for_this_process_and_stops(tmp_path: Path, home: Path) -> None:
    out = _run(tmp_path, home)
    assert out["started"] is True and out["again"] is True  # idempotent: one server
    assert out["url"].startswith("http://127.0.0.1:") and out["url"].endswith("/api")
    assert out["health"] == "true"
    assert out["server_alive"] == [True] and out["after_stop"] == [False]
    assert out["prefect_uses"] == out["url"]  # Prefect, imported by wait(), talks to it
    assert (home / "prefect.db").is_file()  # Prefect's own database


def test_a_configured_server_is_used_as_it_is(tmp_path: Path) -> None:
    out = _run(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert out["started"] is False and out["server_alive"] == []
    assert out["url"] == "http://127.0.0.1:9/api"
    assert not (tmp_path / "prefect-home").exists()


def test_a_server_that_does_not_come_up_is_one_clear_error_and_is_stopped(tmp_path: Path) -> None:
    out = _run(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    assert "did not start within 1 s" in out["error"]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in out["error"]
    assert out["server_alive"] == [False]


def test_a_server_that_exits_while_starting_names_its_exit_code(tmp_path: Path) -> None:
    # A database URL Prefect cannot open: the server's start-up fails and it exits.
    bad = f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'sub' / 'prefect.db'}"
    (tmp_path / "no-such-dir").write_text("a file, not a folder")
    out = _run(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=bad)
    assert "exited with code" in out["error"] and "PREFECT_API_URL" in out["error"]
    assert out["server_alive"] == [False]


def test_a_server_in_the_active_profile_is_used_and_none_is_started(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "remote"\n[profiles.remote]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    out = _run(tmp_path)
    assert out["started"] is False and out["server_alive"] == []
    assert out["url"] is None  # left to Prefect, which reads its profile


def test_a_server_named_in_prefect_toml_wins_over_the_embedded_one(
    tmp_path: Path, home: Path
) -> None:
    # prefect.toml (like .env and pyproject.toml) is only seen by Prefect's own settings: the
    # server starts, and wait() stops it and hands Prefect back its configured URL.
    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:9/api"\n')
    out = _run(tmp_path, home)
    assert out["started"] is True
    assert out["prefect_uses"] == "http://127.0.0.1:9/api"
    assert out["server_alive"] == [False]


def test_a_prepared_server_that_is_never_told_to_serve_writes_nothing(tmp_path: Path) -> None:
    """What a bad input caught by the torch checks leaves: the process spawned by prepare()
    imported and waited; told nothing (stop, or the parent's exit closing its stdin) it ends
    without having created Prefect's database."""
    code = (
        "import sys, time\n"
        "from flows import prefect_api\n"
        "from tasks.launch import _alive\n"
        "assert prefect_api.prepare()\n"
        "pid = prefect_api._SERVER[0].process.pid\n"
        "time.sleep(float(sys.argv[1]))\n"
        "if sys.argv[2] == 'stop':\n"
        "    prefect_api.stop()\n"
        "    assert not _alive(pid)\n"
        "print(pid)\n"
    )
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = cli_env(home)
    for how in ("stop", "exit"):  # long enough for its imports to finish (it then waits)
        proc = subprocess.run([sys.executable, "-c", code, "12", how], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        pid = int(proc.stdout.split()[-1])
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    assert list(home.iterdir()) == []  # no prefect.db: it never served


def test_no_early_spawn_before_prefect_has_a_home(tmp_path: Path) -> None:
    """Importing Prefect creates PREFECT_HOME: on a machine where it does not exist yet, a bad
    input must not leave even that folder behind, so prepare() spawns nothing there."""
    home = tmp_path / "no-home-yet"
    env = cli_env(home)
    code = "from flows import prefect_api\nprint(prefect_api.prepare(), prefect_api._SERVER)\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "[]"]
    assert not home.exists()


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The console script (`python -m flows.cli`), which starts its own server."""
    if not (tmp_path / "data").exists():
        tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--model", "lenet5", "--dataset",
         "imagefolder", "--data-dir", "data", "--epochs", "1", "--batch-size", "2", *args],
        cwd=tmp_path, env=cli_env(tmp_path / "prefect-home", **env), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def test_cli_bad_input_of_the_torch_checks_leaves_no_served_server(tmp_path: Path) -> None:
    (tmp_path / "prefect-home").mkdir()
    proc = _cli(tmp_path, "--set", "device=cuda", CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "device='cuda'" in lines[0], proc.stderr
    assert list((tmp_path / "prefect-home").iterdir()) == []  # no prefect.db: it never served
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_server_that_cannot_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the database folder should be")
    bad = f"sqlite+aiosqlite:///{tmp_path / 'not-a-dir' / 'prefect.db'}"
    proc = _cli(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=bad)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnpipe train: error: Prefect's embedded API server exited"), last
    assert not (tmp_path / "runs").exists()  # no training job started


def test_servers_started_together_on_a_new_home_all_come_up(tmp_path: Path) -> None:
    """Three commands at once on a new PREFECT_HOME: one server migrates the new database, the
    others wait for it (a lock in PREFECT_HOME) instead of failing on "duplicate column"."""
    home = tmp_path / "prefect-home"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            env=cli_env(home),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report.get("health") == "true", f"{report.get('error')}\n{err[-3000:]}"
