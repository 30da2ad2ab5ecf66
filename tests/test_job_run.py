"""One MLflow run per multi-node job (issue 8, item 6): the nodes' flows agree on the run
through the tracking store before torchrun assigns ranks. Real MLflow (SQLite store)."""

from __future__ import annotations

import threading

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


def test_nodes_starting_together_share_one_run(mlflow_store: str) -> None:
    import mlflow

    c, uri, exp = _store(mlflow_store)
    key = job_run.job_key("10.0.0.1:29500", "job-7", "abc123")
    created: list[str] = []
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(3)

    def node() -> None:
        client = mlflow.MlflowClient(uri)
        barrier.wait()  # the three nodes look for the job's run at the same moment
        results.append(job_run.join_or_start(client, exp, key, _starter(client, exp, key, created)))

    threads = [threading.Thread(target=node) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {run_id for run_id, _ in results}
    assert len(ids) == 1, results  # every node logs into the same run
    assert sum(mine for _, mine in results) == 1  # exactly one node owns it
    live = c.search_runs([exp], filter_string=f"tags.`{job_run.JOB_KEY_TAG}` = '{key}'")
    assert [r.info.run_id for r in live] == list(ids)  # the losers' runs are deleted
    assert len(created) >= 1


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
    import time

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
