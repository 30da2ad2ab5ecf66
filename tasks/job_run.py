"""One MLflow run per multi-node job, whichever node torchrun makes global rank 0.

Every node of a multi-node job runs its own flow (`cnnpipe train --nnodes N` per node), and
torchrun's c10d rendezvous assigns ranks by arrival, so no node knows before the job starts
whether it will host rank 0. The nodes therefore agree on the run *before* training, through
the tracking server they share: each looks for a RUNNING run tagged with the job's key, joins
the oldest one, or creates one; either way it waits `SETTLE_S` and re-reads the runs with that
key. When two nodes created runs at the same moment, every node sees both and keeps the oldest
(start time, then run id), and the node whose run lost deletes it. Every node then passes the
same run id to its engine; only global rank 0 logs into it, and that node's flow evaluates,
registers and ends the run.

The key is the rendezvous endpoint and id plus the config hash; only runs started within
`JOIN_WINDOW_S` are joined, so a crashed job's run from another day is never picked up by a new
job on the same endpoint (torchrun's own rendezvous waits at most 600 s for the nodes).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

JOB_KEY_TAG = "cnnpipe.job_key"
JOIN_WINDOW_S = 900.0  # > torchrun's default rendezvous join timeout (600 s)
SETTLE_S = 1.0  # let a node that created its run at the same moment finish creating it


def job_key(rdzv_endpoint: str, rdzv_id: str, config_hash: str) -> str:
    """The identity every node of one multi-node job computes alike."""
    raw = f"{rdzv_endpoint}|{rdzv_id}|{config_hash}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _job_runs(client: Any, experiment_id: str, key: str) -> list[Any]:
    """RUNNING runs of this job started within the join window, oldest first."""
    since = int((time.time() - JOIN_WINDOW_S) * 1000)
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{JOB_KEY_TAG}` = '{key}' and attributes.status = 'RUNNING' "
            f"and attributes.start_time >= {since}"
        ),
        max_results=100,
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def join_or_start(
    client: Any, experiment_id: str, key: str, start: Callable[[], str]
) -> tuple[str, bool]:
    """The job's run id, and whether this node created it. ``start`` creates a RUNNING run
    tagged ``JOB_KEY_TAG=key`` and returns its id."""
    existing = _job_runs(client, experiment_id, key)
    mine = None if existing else start()
    # Joiners settle too: a run another node is still creating may carry an earlier start
    # time than the one this node saw, and then it (not the one seen) is the job's run.
    time.sleep(SETTLE_S)
    runs = _job_runs(client, experiment_id, key) or existing
    winner = runs[0].info.run_id if runs else mine
    if mine is not None and winner != mine:  # another node's run is older: use theirs
        client.delete_run(mine)
    return winner, winner == mine
