"""Shared bits of the tasks and flows: the I/O-only retry condition and the one HTTP health
check (stdlib only, imported lazily, so the CLI can ask before importing mlflow or Prefect)."""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Errors that retrying cannot fix even though they are OSErrors: the input itself is wrong.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive cross-process lock held on the file `path` (created if missing; POSIX
    flock, a no-op elsewhere)."""
    if os.name != "posix":
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def imports_in_background(modules: Sequence[str]) -> Iterator[None]:
    """Import `modules` in a thread while the block runs, and wait for them at its normal end.

    For the block that waits on a training job: this process sits idle, and the job's first
    seconds (torchrun, then the workers importing torch) keep only one core busy, so what the
    steps after it import (torchvision, torch.export, MLflow's model flavours: ~2.5 s on the
    2-core dev VM) costs no wall time there. An import that fails here is left for the step
    that needs it to raise. On an exception the thread is not waited for (it is a daemon)."""
    thread = threading.Thread(
        target=_import_all, args=(tuple(modules),), name="imports-in-background", daemon=True
    )
    thread.start()
    yield
    thread.join()


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def is_io_error(exc: BaseException | None) -> bool:
    """Transient I/O: network errors (URLError, connection resets, timeouts, requests' errors),
    disk hiccups. Bad input (missing files, bad values, checksum mismatches) is not retried."""
    if exc is None or isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (OSError, EOFError, TimeoutError))


def retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the task failed with an I/O error."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result()
        except BaseException as raised:  # noqa: BLE001 - inspecting the failure, not handling
            exc = raised
    return is_io_error(exc)


def health_problem(
    url: str, timeout: float = 5.0, json_body: bytes | None = None, any_answer: bool = False
) -> str | None:
    """None when `url` answers HTTP 200 within `timeout` seconds (with `any_answer`, any HTTP
    status: the server is there), else what went wrong (one request, no retries: callers
    decide whether to wait or to fail with their own fix). A GET, or a POST of `json_body` when
    given. A malformed URL raises ValueError."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} if json_body is not None else {}
    request = urllib.request.Request(url, data=json_body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return None if any_answer else str(exc.reason)
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
