"""Shared bits of the Prefect tasks: the I/O-only retry condition."""

from __future__ import annotations

from typing import Any

# Errors that retrying cannot fix even though they are OSErrors: the input itself is wrong.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


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
