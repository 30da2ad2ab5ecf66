"""A host-wide GPU limit shared by every flow run on a machine: Prefect's global concurrency
limits.

`JobSlots` (tasks/launch.py) hands out GPU ids inside one flow run; nothing stopped the nightly
training and the weekly comparison, two flow runs, from both taking every GPU. Here each
training phase occupies as many slots of the limit `gpus-<host>` as it uses GPUs, so a second
flow run queues until they are free. The limit is created on first use with one slot per GPU
visible on the host (or by `cnnpipe deploy --gpu-limit N`, or `prefect gcl create`), and can be
changed in the Prefect UI (Concurrency) at any time.

CPU-only jobs occupy nothing.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

PREFIX = "gpus-"


def limit_name(host: str | None = None) -> str:
    """`gpus-<host>`: one limit per machine (letters, digits and dashes only)."""
    host = host or socket.gethostname()
    return PREFIX + (re.sub(r"[^a-z0-9-]+", "-", host.lower()).strip("-") or "host")


def visible_gpus() -> int:
    """GPUs this process can use (CUDA_VISIBLE_DEVICES applies)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch/CUDA: no GPUs
        return 0


def ensure_limit(limit: int | None = None, name: str | None = None, update: bool = False) -> int:
    """Create the host's limit if missing (`limit` slots, default: the visible GPUs); with
    `update`, set it to `limit` if it exists. Returns the limit now in force."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = name or limit_name()
    wanted = max(1, visible_gpus() if limit is None else int(limit))
    with get_client(sync_client=True) as client:
        try:
            current = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=wanted)
                )
                return wanted
            except ObjectAlreadyExists:  # created meanwhile by another flow run
                current = client.read_global_concurrency_limit_by_name(name)
        if update and limit is not None and current.limit != wanted:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=wanted))
            return wanted
        return int(current.limit)


@contextmanager
def host_gpus(
    n: int, *, name: str | None = None, timeout_seconds: float | None = None
) -> Iterator[int]:
    """Hold `n` slots of the host's GPU limit for the duration of the block (waits while other
    flow runs hold them). `n <= 0` (CPU jobs) holds nothing. Yields the slots held."""
    if n <= 0:
        yield 0
        return
    from prefect.concurrency.sync import concurrency

    name = name or limit_name()
    limit = ensure_limit(name=name)
    occupy = min(n, limit)  # a job wanting more GPUs than the limit would wait forever
    with concurrency(name, occupy=occupy, timeout_seconds=timeout_seconds, strict=True):
        yield occupy
