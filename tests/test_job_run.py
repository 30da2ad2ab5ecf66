"""One MLflow run per multi-node job (issue 8, item 6): the nodes' flows agree on the run
through the tracking store before torchrun assigns ranks. Real MLflow (SQLite store)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from tasks import job_run


def _store(uri: str) -> tuple[object, str, str]:
    import mlflow

    c = mlflow.MlflowClient(uri)
    return c, uri, c.create_experiment("jobs")


def _starter(c, exp: str, key: str, created: list[str]):
    def start() -> str:
        run_id = c.create_run(exp, tags={job_run.JOB_KEY_TAG: key}).info.run_id
        created.append(run_id)
        return run_id

    return start


def _settle_with(monkeypatch, hook) -> None:
    """Replace join_or_start's settle sleep with `hook`: the tests decide when the nodes'
    writes are visible instead of trusting a 1-s sleep on a loaded machine."""
    monkeypatch.setattr(job_run, "time", SimpleNamespace(time=time.time, sleep=lambda _s: hook()))


def test_nodes_starting_together_share_one_run(mlflow_store: str, monkeypatch) -> None:
    import mlflow

    c, uri, exp = _store(mlflow_store)
    key = job_run.job_key("10.0.0.1:29500", "job-7", "abc123")
    created: list[str] = []
    results: list[tuple[str, bool]] = []
    nodes = 6
    start, settled = threading.Barrier(nodes), threading.Barrier(nodes)
    _settle_with(monkeypatch, lambda: settled.wait(60))  # every node has created or joined

    def node() -> None:
        client = mlflow.MlflowClient(uri)
        start.wait(60)  # the nodes look for the job's run at the same moment
        results.append(job_run.join_or_start(client, exp, key, _starter(client, exp, key, created)))

    threads = [threading.Thread(target=node) for _ in range(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {run_id for run_id, _ in results}
    assert len(results) == nodes
    assert len(ids) == 1, results  # every node logs into the same run
    assert sum(mine for _, mine in results) == 1  # exactly one node owns it
    live = c.search_runs([exp], filter_string=f"tags.`{job_run.JOB_KEY_TAG}` = '{key}'")
    assert [r.info.run_id for r in live] == list(ids)  # the losers' runs are deleted
    assert len(created) >= 1


def test_a_run_committed_late_with_an_earlier_start_wins_for_joiners_too(
    mlflow_store: str, monkeypatch
) -> None:
    """Node S stamps its run's start time, but its create commits late; meanwhile F creates a
    later-stamped run and J sees only F's. Once S's run is visible it is the oldest, so all
    three (J included, who joined without creating) must end on S's run."""
    import mlflow

    c, uri, exp = _store(mlflow_store)
    key = job_run.job_key("10.0.0.1:29500", "job-9", "abc123")
    s_looked, f_created, s_created = threading.Event(), threading.Event(), threading.Event()
    settling = {name: threading.Event() for name in "SFJ"}
    results: dict[str, tuple[str, bool]] = {}

    def settle() -> None:  # a node has made its first read (and created its run, if any)
        settling[threading.current_thread().name].set()
        s_created.wait(60)

    _settle_with(monkeypatch, settle)

    def slow_start() -> str:
        stamped = int(time.time() * 1000) - 50
        s_looked.set()
        settling["J"].wait(60)  # J has read the runs and seen only F's
        run_id = c.create_run(exp, start_time=stamped, tags={job_run.JOB_KEY_TAG: key})
        s_created.set()
        return run_id.info.run_id

    def fast_start() -> str:
        run_id = c.create_run(exp, tags={job_run.JOB_KEY_TAG: key}).info.run_id
        f_created.set()
        return run_id

    def never_start() -> str:
        raise AssertionError("J should join, not create")

    def node(wait: threading.Event | None, start) -> None:
        if wait is not None:
            wait.wait(60)
        client = mlflow.MlflowClient(uri)
        results[threading.current_thread().name] = job_run.join_or_start(client, exp, key, start)

    threads = [
        threading.Thread(target=node, name="S", args=(None, slow_start)),
        threading.Thread(target=node, name="F", args=(s_looked, fast_start)),
        threading.Thread(target=node, name="J", args=(f_created, never_start)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {run_id for run_id, _ in results.values()} == {results["S"][0]}, results
    assert results["S"][1] and not results["F"][1] and not results["J"][1]


def test_a_later_node_joins_and_other_jobs_do_not(mlflow_store: str, monkeypatch) -> None:
    c, _, exp = _store(mlflow_store)
    monkeypatch.setattr(job_run, "SETTLE_S", 0.0)
    key = job_run.job_key("10.0.0.1:29500", "job-7", "abc123")
    first, mine = job_run.join_or_start(c, exp, key, _starter(c, exp, key, []))
    assert mine
    assert job_run.join_or_start(c, exp, key, _starter(c, exp, key, [])) == (first, False)
    # Another config, another rendezvous id, or a finished run: a new job, a new run.
    for other in (
        job_run.job_key("10.0.0.1:29500", "job-7", "def456"),
        job_run.job_key("10.0.0.1:29500", "job-8", "abc123"),
    ):
        assert job_run.join_or_start(c, exp, other, _starter(c, exp, other, []))[0] != first
    c.set_terminated(first)
    again, mine = job_run.join_or_start(c, exp, key, _starter(c, exp, key, []))
    assert mine and again != first


def test_a_stale_run_of_the_same_key_is_not_joined(mlflow_store: str, monkeypatch) -> None:
    """A crashed job's run, still RUNNING days later, is not picked up by a new job."""
    c, _, exp = _store(mlflow_store)
    monkeypatch.setattr(job_run, "SETTLE_S", 0.0)
    key = job_run.job_key("10.0.0.1:29500", "cnnpipe", "abc123")
    stale = c.create_run(
        exp, start_time=int((time.time() - 2 * job_run.JOIN_WINDOW_S) * 1000),
        tags={job_run.JOB_KEY_TAG: key},
    ).info.run_id  # fmt: skip
    run_id, mine = job_run.join_or_start(c, exp, key, _starter(c, exp, key, []))
    assert mine and run_id != stale


@pytest.mark.parametrize("endpoint", ["127.0.0.1:29500", "node-a:1234"])
def test_job_key_is_stable(endpoint: str) -> None:
    assert job_run.job_key(endpoint, "x", "h") == job_run.job_key(endpoint, "x", "h")
    assert len(job_run.job_key(endpoint, "x", "h")) == 16
