"""Shared bits of the tasks and flows: the I/O-only retry condition and the one HTTP health
check (stdlib only, imported lazily, so the CLI can ask before importing mlflow or Prefect)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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
